"""From a trained run to the line: calibrated decisions (calibrate), prediction at scale (predict), export."""
