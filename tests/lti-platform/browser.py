#!/usr/bin/env python3
"""Opens a platform course page in headless Chromium and reports what the
LTI tool framed in it shows.

The course page is on http://localhost:<platform port>; the tool on
http://127.0.0.1:<tool port>: a cross-site iframe. Modes:
  third-party-blocked  third-party cookies blocked (partitioned cookies may pass)
  all-blocked          every cookie blocked: only the LTI postMessage storage
                       flow can carry the launch state

Prints one JSON line: {"ready", "me", "frame_url", "storage", "new_window"};
new_window is true only once the "open in a new window" offer is shown (the
platform-storage page carries it hidden while it waits for the answer).
Uses Debian's chromium and chromedriver through selenium (no downloads).
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--driver", default="/usr/bin/chromedriver")
    ap.add_argument("--mode", choices=["third-party-blocked", "all-blocked"], default="all-blocked")
    ap.add_argument("--timeout", type=float, default=40)
    args = ap.parse_args()

    profile = tempfile.mkdtemp(prefix="viva-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = args.chromium
    for a in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ]:
        opts.add_argument(a)
    prefs = {"profile.cookie_controls_mode": 1, "profile.block_third_party_cookies": True}
    if args.mode == "all-blocked":
        prefs["profile.default_content_setting_values.cookies"] = 2
    opts.add_experimental_option("prefs", prefs)
    driver = webdriver.Chrome(service=Service(args.driver), options=opts)
    result = {"ready": None, "me": None, "frame_url": None, "storage": None, "new_window": False}
    try:
        driver.get(args.url)
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            driver.switch_to.default_content()
            result["storage"] = driver.execute_script("return window.storageLog || []")
            frames = driver.find_elements(By.ID, "tool")
            if not frames:
                time.sleep(0.2)
                continue
            driver.switch_to.frame(frames[0])
            state = driver.execute_script(
                "return [document.body ? document.body.getAttribute('data-ready') : null,"
                " location.href, (function(){var e=document.getElementById('new-window'); return !!e && !e.closest('[hidden]');})(),"
                " document.getElementById('me') ? document.getElementById('me').textContent : null,"
                " document.getElementById('error-code') ? document.getElementById('error-code').textContent : null]"
            )
            result["ready"], result["frame_url"], result["new_window"], result["me"], result["error"] = state
            if result["ready"] in ("1", "error") or result["new_window"] or result["error"]:
                break
            time.sleep(0.2)
        driver.switch_to.default_content()
        result["storage"] = driver.execute_script("return window.storageLog || []")
    finally:
        driver.quit()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
