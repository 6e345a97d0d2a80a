"""The README's pictures of `prn serve`'s page: a live server on 127.0.0.1, headless chromium
(Debian's chromium and chromium-driver, driven by selenium), a few images uploaded.

    python tools/serve_screenshot.py runs/demo/latest IMAGE... --out docs/images/serve.png
    python tools/serve_screenshot.py RUN IMAGE... --paint faint.png:60,150,180,110 \\
        --out docs/images/serve_corrections.png

The slider is left at the calibrated threshold; the page is captured at --width x --height.
``--paint NAME:X0,Y0,X1,Y1`` marks the card of upload NAME wrong and brushes a stroke from
(X0, Y0) to (X1, Y1), in the image's pixels, then saves the correction (into a temporary folder,
never the run's). ``--colors N`` stores the picture with an N-colour palette, to keep it small;
``--min-region-area`` is the server's.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from prn.serve import build_app


def paint(driver, wait, spec: str) -> None:
    """Open the correction of the card named in ``spec`` and brush its stroke, then save."""
    name, coords = spec.rsplit(":", 1)
    x0, y0, x1, y1 = (float(v) for v in coords.split(","))
    card = next(c for c in driver.find_elements(By.CLASS_NAME, "card")
                if c.find_element(By.CLASS_NAME, "name").text == name)
    card.find_element(By.CLASS_NAME, "wrong").click()
    canvas = card.find_element(By.CSS_SELECTOR, "canvas.paint")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    time.sleep(0.3)
    width, height, natural_w, natural_h = driver.execute_script(
        "const c = arguments[0], r = c.getBoundingClientRect(), card = c.closest('.card');"
        "const img = card.querySelector('img');"
        "return [r.width, r.height, img.naturalWidth, img.naturalHeight];", canvas)

    def offset(x, y):  # image pixels -> offsets from the canvas centre, in CSS pixels
        return round(x * width / natural_w - width / 2), round(y * height / natural_h - height / 2)

    chain = ActionChains(driver).move_to_element_with_offset(canvas, *offset(x0, y0)).click_and_hold()
    for k in range(1, 9):
        chain.move_to_element_with_offset(canvas, *offset(x0 + (x1 - x0) * k / 8, y0 + (y1 - y0) * k / 8))
    chain.release().perform()
    card.find_element(By.CLASS_NAME, "save-defect").click()
    wait.until(lambda d: card.find_elements(By.CSS_SELECTOR, ".saved, .panel .error"))
    if not card.find_elements(By.CLASS_NAME, "saved"):
        raise SystemExit(f"the correction was not saved: {card.text}")
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/images/serve.png"))
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--paint", metavar="NAME:X0,Y0,X1,Y1", help="paint a missed defect on that card and save it")
    ap.add_argument("--operator", default="operator")
    ap.add_argument("--colors", type=int, default=0, help="store with a palette of this many colours (0: full)")
    ap.add_argument("--min-region-area", type=int, help="the server's --min-region-area (default 1)")
    args = ap.parse_args()

    corrections = Path(tempfile.mkdtemp(prefix="prn-screenshot-"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(args.run, corrections=corrections,
                                                      min_region_area=args.min_region_area), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={args.width},{args.height}", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        wait.until(lambda d: "model" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "operator").send_keys(args.operator + "\t")
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p.resolve()) for p in args.images))
        wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == len(args.images))
        time.sleep(0.5)  # images painted
        if args.paint:
            paint(driver, wait, args.paint)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)
        shutil.rmtree(corrections, ignore_errors=True)
    if args.colors:
        Image.open(args.out).convert("RGB").quantize(args.colors, method=Image.Quantize.FASTOCTREE).save(
            args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
