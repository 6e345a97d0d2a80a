"""The README's picture of `prn serve`'s page: a live server on 127.0.0.1, headless chromium
(Debian's chromium and chromium-driver, driven by selenium), a few images uploaded.

    python tools/serve_screenshot.py runs/demo/latest IMAGE... --out docs/images/serve.png

The slider is left at the calibrated threshold; the page is captured at --width x --height.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from prn.serve import build_app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/images/serve.png"))
    ap.add_argument("--width", type=int, default=1100)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(args.run), log_level="warning"))
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
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p.resolve()) for p in args.images))
        wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "card")) == len(args.images))
        time.sleep(0.5)  # images painted
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        server.should_exit = True
        thread.join(10)
    print(args.out)


if __name__ == "__main__":
    main()
