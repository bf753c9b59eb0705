#!/usr/bin/env python3
"""Drives Viva's web widget in headless Chromium (Debian's chromium and
chromedriver through selenium; nothing is downloaded) for tests/tests/widget.rs.

Scenarios (first argument):
  student-upload   upload a video, watch phase and position, get the result
  student-record   keyboard only: record with the fake camera/microphone
                   (an espeak-ng WAV), submit, read the real transcript
  instructor-edit  edit the rubric and configure the plugin through its form
  instructor-review  review a flagged submission, override, release
  admin            the admin view: health, models, registrations, plugins
  student-french   a browser set to French: the student view in French,
                   upload, the released result with French captions
  instructor-french  the same browser: dashboard, rubric editor (language
                   and vocabulary) and review with Whisper's unsure words

Every scenario checks what it does (an AssertionError fails it), runs
axe-core when --axe is given, saves screenshots into --out, fails on browser
console errors (CSP violations among them), and prints one JSON line with
what it saw. Tokens are passed in the URL fragment, which is never sent to
the server.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request

os.environ.setdefault("SE_OFFLINE", "true")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402

RESULT = {"screenshots": [], "axe": {}, "console": []}


def make_driver(args, audio=None, lang=None):
    profile = tempfile.mkdtemp(prefix="viva-widget-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = args.chromium
    flags = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
    ]
    if audio:
        flags += [
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={audio}%noloop",
        ]
    if lang:
        # The browser's language: navigator.languages and Accept-Language.
        flags.append(f"--lang={lang}")
        opts.add_experimental_option("prefs", {"intl.accept_languages": lang})
    for f in flags:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(args.driver), options=opts)


def wait(driver, cond, timeout=30, what="condition", poll=0.1):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = cond()
            if last:
                return last
        except Exception as e:  # element not there yet
            last = e
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def q(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css)


def text(driver, css):
    # Live regions are re-rendered by status events: an element found a
    # moment ago may be gone when its text is read. Read it again.
    for _ in range(20):
        try:
            els = driver.find_elements(By.CSS_SELECTOR, css)
            return els[0].text if els else ""
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"{css} kept being replaced while it was read")


def shot(driver, args, name):
    path = os.path.join(args.out, f"{args.scenario}-{name}.png")
    driver.save_screenshot(path)
    RESULT["screenshots"].append(path)


def console_errors(driver):
    errs = []
    for e in driver.get_log("browser"):
        msg = e.get("message", "")
        # Refusals the page shows on purpose (a 4xx answer) are not errors of
        # the page; script errors and CSP violations are.
        if e.get("level") == "SEVERE" and "favicon" not in msg and "responded with a status of 4" not in msg:
            errs.append(msg)
    RESULT["console"] += errs
    return errs


def axe(driver, args, name):
    if not args.axe:
        return
    with open(args.axe, encoding="utf-8") as f:
        driver.execute_script(f.read())
    res = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map(v => ("
        "{id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length,"
        " targets: v.nodes.slice(0, 3).map(n => n.target.join(' '))})))).catch(e => done([{id: 'axe-error', impact: 'critical', help: String(e)}]));"
    )
    RESULT["axe"][name] = res
    bad = [v for v in res if v["impact"] in ("serious", "critical")]
    assert not bad, f"axe found serious/critical violations on {name}: {json.dumps(bad, indent=1)}"


def no_overflow(driver, width, name):
    driver.set_window_size(width, 900)
    time.sleep(0.4)
    sw, iw = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    RESULT.setdefault("widths", {})[f"{name}@{width}"] = [sw, iw]
    assert sw <= iw + 1, f"{name} scrolls sideways at {width}px: content {sw}px wide in {iw}px"


def open_app(driver, args, token, extra=""):
    driver.get(f"{args.base}/app#token={token}{extra}")
    wait(driver, lambda: driver.execute_script("return document.body.getAttribute('data-ready')") in ("1", "error"), what="the widget to start")
    assert driver.execute_script("return document.body.getAttribute('data-ready')") == "1", text(driver, "body")
    assert "token" not in driver.current_url, "the token must leave the address bar"


def api(args, method, path, token, body=None):
    req = urllib.request.Request(f"{args.base}{path}", method=method, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                                 data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def keys(driver, *k):
    ActionChains(driver).send_keys(*k).perform()


def active(driver):
    return driver.execute_script(
        "const a = document.activeElement; return a ? (a.getAttribute('data-testid') || a.tagName + ':' + (a.textContent || '').trim().slice(0, 40)) : null")


def tab_to(driver, testid, limit=60):
    """Presses Tab until the element with data-testid has focus; returns the presses."""
    for n in range(1, limit + 1):
        keys(driver, Keys.TAB)
        if active(driver) == testid:
            return n
    raise AssertionError(f"Tab never reached {testid} in {limit} presses (last focus: {active(driver)})")


# ---- scenarios -------------------------------------------------------------------------


def student_status_step(driver, args, seen, shots):
    """Reads the live status once into `seen`; returns (phase, position)."""
    cur = driver.execute_script(
        "const a = document.querySelector('[data-testid=phases] [aria-current=step]'); return a ? a.getAttribute('data-phase') : null")
    pos = text(driver, "[data-testid=position]")
    for key, val in (("phases", cur), ("positions", pos), ("system", text(driver, "[data-testid=system-phase]")),
                     ("batch", text(driver, "[data-testid=batch-progress]")), ("eta", text(driver, "[data-testid=eta]"))):
        if val and (not seen[key] or seen[key][-1] != val):
            seen[key].append(val)
    return cur, pos


def student_upload(driver, args):
    open_app(driver, args, args.token, "&assignment=sandbox-oral-1")
    wait(driver, lambda: q(driver, "[data-testid=mode-upload]"), what="the answer form")
    q(driver, "[data-testid=mode-upload]").click()
    # Checked before sending: a wrong type is refused in the page.
    bad = os.path.join(args.out, "notes.txt")
    with open(bad, "w") as f:
        f.write("not a video")
    q(driver, "[data-testid=file-input]").send_keys(bad)
    wait(driver, lambda: "not accepted" in text(driver, "[data-testid=file-status]"), what="the type check")
    assert q(driver, "[data-testid=file-submit]").get_attribute("disabled") is not None
    q(driver, "[data-testid=file-input]").send_keys(args.file)
    wait(driver, lambda: "Chosen" in text(driver, "[data-testid=file-status]"), what="the file check")
    shot(driver, args, "1-chosen")
    q(driver, "[data-testid=file-submit]").click()
    wait(driver, lambda: q(driver, "[data-testid=status]"), what="the live status")
    seen = {"positions": [], "phases": [], "system": [], "batch": [], "eta": [], "uploaded": text(driver, ".user-status li")}
    shots = 0
    deadline = time.time() + args.timeout
    released = False
    while time.time() < deadline:
        if driver.find_elements(By.CSS_SELECTOR, "[data-testid=result]"):
            break
        if driver.find_elements(By.CSS_SELECTOR, "[data-testid=awaiting-review]") and not released:
            seen["awaiting_review"] = text(driver, "[data-testid=awaiting-review]")
            shot(driver, args, "4-awaiting-review")
            if args.instructor_token:
                api(args, "POST", f"/api/v1/submissions/{args.submission_hint()}/release", args.instructor_token)
            released = True
        if driver.find_elements(By.CSS_SELECTOR, "[data-testid=phases]"):
            try:
                cur, pos = student_status_step(driver, args, seen, shots)
            except StaleElementReferenceException:
                # The status re-rendered mid-read: poll again.
                time.sleep(0.05)
                continue
            if shots == 0 and "Position" in pos:
                shot(driver, args, "2-queued")
                axe(driver, args, "student-status")
                shots = 1
            if shots == 1 and cur == "evaluation":
                shot(driver, args, "3-evaluation")
                shots = 2
        time.sleep(0.1)
    wait(driver, lambda: q(driver, "[data-testid=result]"), timeout=5, what="the released result")
    seen["total"] = text(driver, "[data-testid=total]")
    seen["criteria_rows"] = len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=criteria] tbody tr"))
    seen["criteria_text"] = text(driver, "[data-testid=criteria]")
    seen["result_text"] = text(driver, "[data-testid=result]")
    wait(driver, lambda: q(driver, "[data-testid=player]"), what="the media player")
    seen["preview"] = q(driver, "[data-testid=player]").get_attribute("data-preview")
    seen["transcript"] = text(driver, "[data-testid=transcript]")
    shot(driver, args, "5-result")
    axe(driver, args, "student-result")
    no_overflow(driver, 320, "student-result")
    shot(driver, args, "5-result-320")
    no_overflow(driver, 1280, "student-result")
    RESULT["seen"] = seen


def student_record(driver, args):
    open_app(driver, args, args.token, "&assignment=sandbox-oral-1")
    wait(driver, lambda: q(driver, "[data-testid=record-start]"), what="the recorder")
    axe(driver, args, "student-form")
    shot(driver, args, "1-form")
    presses = {"start": tab_to(driver, "record-start")}
    keys(driver, Keys.ENTER)
    wait(driver, lambda: active(driver) == "record-stop", timeout=20, what="focus on Stop once recording")
    wait(driver, lambda: "Recording" in text(driver, "[data-testid=record-status]"), what="recording")
    level = 0.0
    t_end = time.time() + args.record_seconds
    while time.time() < t_end:
        level = max(level, driver.execute_script("const m = document.querySelector('meter'); return m ? m.value : 0"))
        time.sleep(0.2)
    shot(driver, args, "2-recording")
    assert active(driver) == "record-stop", active(driver)
    keys(driver, Keys.ENTER)
    wait(driver, lambda: active(driver) == "record-submit", what="focus on Submit after stopping")
    wait(driver, lambda: q(driver, "[data-testid=record-preview]"), what="the preview")
    shot(driver, args, "3-preview")
    keys(driver, Keys.ENTER)
    wait(driver, lambda: q(driver, "[data-testid=status]"), timeout=60, what="the live status after the upload")
    shot(driver, args, "4-status")
    wait(driver, lambda: q(driver, "[data-testid=transcript]").text.strip() and driver.find_elements(By.CSS_SELECTOR, "[data-testid=awaiting-review], [data-testid=result]"),
         timeout=args.timeout, what="the transcript")
    transcript = text(driver, "[data-testid=transcript]")
    # Keyboard again: the first transcript line plays the recording from there.
    wait(driver, lambda: q(driver, "[data-testid=player]"), what="the player")
    n = 0
    while n < 60:
        keys(driver, Keys.TAB)
        n += 1
        if driver.execute_script("return document.activeElement && document.activeElement.classList.contains('seg')"):
            break
    assert n < 60, "Tab never reached a transcript line"
    keys(driver, Keys.ENTER)
    wait(driver, lambda: driver.execute_script("const p = document.querySelector('[data-testid=player]'); return p && !p.paused"), timeout=10, what="playback from the transcript")
    shot(driver, args, "5-transcript")
    axe(driver, args, "student-transcript")
    RESULT["seen"] = {"transcript": transcript, "presses": presses, "max_level": level,
                      "state": "awaiting" if driver.find_elements(By.CSS_SELECTOR, "[data-testid=awaiting-review]") else "result"}


def set_value(driver, el, value):
    el.clear()
    el.send_keys(str(value))


def instructor_edit(driver, args):
    open_app(driver, args, args.token, "&view=instructor")
    wait(driver, lambda: q(driver, "[data-testid=dashboard]"), what="the dashboard")
    shot(driver, args, "1-dashboard")
    tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]") if b.text == "Rubric and plugin"][0]
    tab.click()
    wait(driver, lambda: q(driver, "[data-testid=criteria-editor] fieldset"), what="the rubric editor")
    wait(driver, lambda: q(driver, "[data-testid=plugin-form] [data-key=min_segment_confidence]"), what="the generated plugin form")
    # Rubric: rename the first criterion and add a fourth level to it.
    set_value(driver, q(driver, "[data-testid=criterion-0-title]"), "Scientific content")
    q(driver, "[data-testid=add-level-0]").click()
    wait(driver, lambda: q(driver, "[data-testid=level-0-3-label]"), what="the new level")
    set_value(driver, q(driver, "[data-testid=level-0-3-label]"), "outstanding")
    set_value(driver, q(driver, "[data-testid=level-0-3-points]"), 5)
    # The generated form: an out-of-range value is refused before saving…
    conf = q(driver, "[data-testid=plugin-form] [data-key=min_segment_confidence]")
    set_value(driver, conf, 7)
    q(driver, "[data-testid=save-assignment]").click()
    wait(driver, lambda: "not valid" in text(driver, "[data-testid=config-message]"), what="the refused configuration")
    refused = text(driver, "[data-testid=config-message]")
    # …then a strict confidence threshold that flags every submission for review.
    set_value(driver, conf, 0.95)
    gap = q(driver, "[data-testid=plugin-form] [data-key=max_level_gap]")
    set_value(driver, gap, 0)
    q(driver, "[data-testid=save-assignment]").click()
    wait(driver, lambda: "saved" in text(driver, "[data-testid=rubric-message]").lower(), what="the save")
    shot(driver, args, "2-rubric-saved")
    axe(driver, args, "instructor-rubric")
    no_overflow(driver, 320, "instructor-rubric")
    shot(driver, args, "2-rubric-320")
    no_overflow(driver, 1280, "instructor-rubric")
    RESULT["seen"] = {"refused": refused, "saved": text(driver, "[data-testid=rubric-message]")}


def instructor_review(driver, args):
    open_app(driver, args, args.token, "&view=instructor")
    wait(driver, lambda: q(driver, "[data-testid=dashboard] table"), what="the dashboard table")
    row = wait(driver, lambda: q(driver, f"tr[data-submission='{args.submission}'][data-state=awaiting_review]"), what="the flagged row")
    seen = {"row": row.text}
    failed = driver.find_elements(By.CSS_SELECTOR, "tr[data-state=failed] [data-testid=retry]")
    seen["retry_buttons"] = len(failed)
    shot(driver, args, "1-dashboard")
    axe(driver, args, "instructor-dashboard")
    if failed:
        failed[0].click()
        wait(driver, lambda: "back to the queue" in driver.find_element(By.CSS_SELECTOR, "[data-testid=dashboard]").find_element(By.XPATH, "..").text,
             what="the retry confirmation")
        seen["retried"] = True
    q(driver, f"tr[data-submission='{args.submission}'] [data-testid=review]").click()
    wait(driver, lambda: q(driver, "[data-testid=override-form]"), what="the review screen")
    wait(driver, lambda: q(driver, "[data-testid=player]"), what="the video")
    seen["preview"] = q(driver, "[data-testid=player]").get_attribute("data-preview")
    seen["reasons"] = text(driver, "[data-testid=review-reasons]")
    seen["evaluator_columns"] = len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=evaluations] thead th"))
    seen["disagreements"] = len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=evaluations] tr.disagree"))
    seen["plugin_report"] = text(driver, "[data-testid=plugin-report]")
    shot(driver, args, "2-review")
    axe(driver, args, "instructor-review")
    no_overflow(driver, 320, "instructor-review")
    shot(driver, args, "2-review-320")
    no_overflow(driver, 1280, "instructor-review")
    crit = args.criterion
    set_value(driver, q(driver, f"[data-testid=points-{crit}]"), args.points)
    set_value(driver, q(driver, f"[data-testid=feedback-{crit}]"), "Clear and accurate; well done.")
    set_value(driver, q(driver, "[data-testid=override-note]"), "listened to the recording")
    q(driver, "[data-testid=save-override]").click()
    wait(driver, lambda: "Saved" in text(driver, "[data-testid=review-message]"), what="the override")
    wait(driver, lambda: q(driver, "[data-testid=audit] li[data-action='submission.override']"), what="the override in the audit log")
    seen["audit_override"] = text(driver, "[data-testid=audit] li[data-action='submission.override']")
    wait(driver, lambda: q(driver, "[data-testid=release]").is_enabled(), what="the release button")
    q(driver, "[data-testid=release]").click()
    wait(driver, lambda: q(driver, "[data-testid=audit] li[data-action='submission.release']"), what="the release in the audit log")
    seen["audit_release"] = text(driver, "[data-testid=audit] li[data-action='submission.release']")
    seen["locked"] = q(driver, f"[data-testid=points-{crit}]").get_attribute("disabled") is not None
    shot(driver, args, "3-released")
    RESULT["seen"] = seen


def instructor_versions(driver, args):
    """The Versions tab after a points-only edit: versions list, rescore, progress."""
    open_app(driver, args, args.token, "&view=instructor")
    wait(driver, lambda: q(driver, "[data-testid=dashboard]"), what="the dashboard")
    tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]") if b.text == "Versions"][0]
    tab.click()
    wait(driver, lambda: "older version" in text(driver, "[data-testid=version-status]"), what="the stale submission")
    seen = {"status": text(driver, "[data-testid=version-status]"), "table": text(driver, "[data-testid=version-table]")}
    shot(driver, args, "1-versions")
    axe(driver, args, "instructor-versions")
    q(driver, "[data-testid=rescore]").click()
    wait(driver, lambda: "1 of 1 done" in text(driver, "[data-testid=rescores]"), what="the rescore to finish", timeout=60)
    wait(driver, lambda: "current version" in text(driver, "[data-testid=version-status]"), what="the status to refresh")
    seen["message"] = text(driver, "[data-testid=rescore-message]")
    seen["rescores"] = text(driver, "[data-testid=rescores]")
    seen["done_status"] = text(driver, "[data-testid=version-status]")
    seen["progress"] = driver.execute_script("const p = document.querySelector('[data-testid=rescores] progress'); return p ? [p.value, p.max] : null")
    shot(driver, args, "2-rescored")
    axe(driver, args, "instructor-rescored")
    no_overflow(driver, 320, "instructor-versions")
    shot(driver, args, "3-versions-320")
    no_overflow(driver, 1280, "instructor-versions")
    RESULT["seen"] = seen


def instructor_calibration(driver, args):
    """Release a selection from the queue, grade one submission blind (the
    evaluations hidden until the levels are in), mark it as an exemplar, and
    read the calibration tab with its verdict and release requirement."""
    open_app(driver, args, args.token, "&view=instructor")
    wait(driver, lambda: q(driver, "[data-testid=dashboard] table"), what="the dashboard table")
    chosen = args.select.split(",")
    for sid in chosen:
        box = wait(driver, lambda: q(driver, f"tr[data-submission='{sid}'] [data-testid=select]"), what="a row's checkbox")
        box.click()
    seen = {"button": text(driver, "[data-testid=release-selected]")}
    shot(driver, args, "1-selection")
    axe(driver, args, "instructor-selection")
    # The queue refreshes every 3 s: the selection must survive it.
    time.sleep(3.5)
    seen["after_refresh"] = text(driver, "[data-testid=release-selected]")
    q(driver, "[data-testid=release-selected]").click()
    wait(driver, lambda: all(q(driver, f"tr[data-submission='{sid}'][data-state=released]") for sid in chosen), what="the released rows")
    seen["released_message"] = driver.find_element(By.CSS_SELECTOR, "[data-testid=dashboard]").find_element(By.XPATH, "..").text
    # Grade blind first.
    q(driver, "[data-testid=blind-first]").click()
    q(driver, f"tr[data-submission='{args.submission}'] [data-testid=review]").click()
    wait(driver, lambda: q(driver, "[data-testid=blind-form]"), what="the blind grading form")
    seen["hidden"] = not driver.find_elements(By.CSS_SELECTOR, "[data-testid=evaluations], [data-testid=review-reasons], [data-testid=plugin-report]")
    q(driver, "[data-testid=blind-submit]").click()
    wait(driver, lambda: "Choose a level for:" in text(driver, "[data-testid=blind-grade]"), what="the refusal of an incomplete grade")
    for crit, level in [pair.split("=") for pair in args.levels.split(",")]:
        Select(q(driver, f"[data-testid=blind-{crit}]")).select_by_value(level)
    shot(driver, args, "2-blind")
    axe(driver, args, "instructor-blind")
    q(driver, "[data-testid=blind-submit]").click()
    wait(driver, lambda: q(driver, "[data-testid=evaluations]"), what="the evaluations, once graded")
    wait(driver, lambda: q(driver, "[data-testid=instructor-grade] li"), what="the instructor's levels")
    seen["mine"] = text(driver, "[data-testid=instructor-grade]")
    q(driver, "[data-testid=exemplar-toggle]").click()
    wait(driver, lambda: q(driver, "[data-testid=exemplar-state]"), what="the exemplar mark")
    shot(driver, args, "3-revealed")
    q(driver, "[data-testid=back]").click()
    tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]") if b.text == "Calibration"][0]
    tab.click()
    wait(driver, lambda: q(driver, "[data-testid=calibration-verdict]"), what="the calibration verdict")
    seen["verdict"] = text(driver, "[data-testid=calibration-verdict]")
    seen["rows"] = len(driver.find_elements(By.CSS_SELECTOR, "table.calibration tbody tr"))
    set_value(driver, q(driver, "[data-testid=gate-qwk]"), "0.7")
    set_value(driver, q(driver, "[data-testid=gate-sample]"), "5")
    q(driver, "[data-testid=gate-form] button[type=submit]").click()
    wait(driver, lambda: "not met" in text(driver, "[data-testid=gate-state]"), what="the saved requirement")
    seen["gate"] = text(driver, "[data-testid=gate-state]")
    driver.execute_script("document.querySelector('[data-testid=calibration-verdict]').scrollIntoView()")
    shot(driver, args, "4-calibration")
    axe(driver, args, "instructor-calibration")
    no_overflow(driver, 320, "instructor-calibration")
    shot(driver, args, "4-calibration-320")
    no_overflow(driver, 1280, "instructor-calibration")
    RESULT["seen"] = seen


def admin(driver, args):
    open_app(driver, args, args.token, "&view=admin")
    wait(driver, lambda: q(driver, "[data-testid=health]"), what="health")
    seen = {"health": text(driver, "[data-testid=health]")}
    shot(driver, args, "1-health")
    axe(driver, args, "admin-health")
    tabs = {b.text: b for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]")}
    # Keyboard: arrow keys move between the admin tabs.
    tabs["Health"].click()
    keys(driver, Keys.ARROW_RIGHT)
    wait(driver, lambda: q(driver, "[data-testid=models]"), what="the models tab by keyboard")
    seen["models"] = text(driver, "[data-testid=models]")
    seen["swaps"] = text(driver, "[data-testid=memory-swaps]") if driver.find_elements(By.CSS_SELECTOR, "[data-testid=memory-swaps]") else ""
    seen["remote"] = text(driver, "[data-testid=remote-servers]") if driver.find_elements(By.CSS_SELECTOR, "[data-testid=remote-servers]") else ""
    shot(driver, args, "2-models")
    axe(driver, args, "admin-models")
    no_overflow(driver, 320, "admin-models")
    no_overflow(driver, 1280, "admin-models")
    tabs["Registrations"].click()
    wait(driver, lambda: q(driver, "[data-testid=dynreg]"), what="registrations")
    seen["dynreg"] = text(driver, "[data-testid=dynreg]")
    [b for b in driver.find_elements(By.CSS_SELECTOR, "button") if b.text == "Make a one-time registration URL"][0].click()
    wait(driver, lambda: "invite=" in text(driver, "[data-testid=invite-url]"), what="the one-time registration URL")
    seen["invite"] = text(driver, "[data-testid=invite-url]")
    shot(driver, args, "3-registrations")
    axe(driver, args, "admin-registrations")
    tabs["Plugins"].click()
    wait(driver, lambda: q(driver, "[data-testid=plugins]"), what="plugins")
    seen["plugins"] = text(driver, "[data-testid=plugins]")
    if args.file:
        q(driver, "[data-testid=plugin-file]").send_keys(args.file)
        [b for b in driver.find_elements(By.CSS_SELECTOR, "button") if b.text == "Upload and validate"][0].click()
        wait(driver, lambda: text(driver, "[data-testid=plugin-message]"), what="the upload verdict")
        seen["upload"] = text(driver, "[data-testid=plugin-message]")
    shot(driver, args, "4-plugins")
    axe(driver, args, "admin-plugins")
    tabs["Installation checks"].click()
    wait(driver, lambda: q(driver, "[data-testid=doctor]"), what="the installation checks")
    seen["doctor"] = text(driver, "[data-testid=doctor]")
    seen["doctor_summary"] = text(driver, "[data-testid=doctor-summary]")
    shot(driver, args, "5-doctor")
    axe(driver, args, "admin-doctor")
    no_overflow(driver, 320, "admin-doctor")
    no_overflow(driver, 1280, "admin-doctor")
    shot(driver, args, "5-doctor-1280")
    RESULT["seen"] = seen


def french_page(driver):
    """The page speaks French: <html lang>, and no English of the core strings."""
    lang = driver.execute_script("return document.documentElement.lang")
    assert lang == "fr", f"<html lang> is {lang!r}"
    body = text(driver, "body")
    for english in ("Signed in as", "Your answer", "Your result", "Queue dashboard", "Save assignment"):
        assert english not in body, f"English left on the French page: {english!r} in {body[:400]!r}"
    return lang


def student_french(driver, args):
    open_app(driver, args, args.token, f"&assignment={args.assignment}")
    wait(driver, lambda: q(driver, "[data-testid=mode-upload]"), what="the answer form")
    seen = {"lang": french_page(driver), "upload_button": driver.execute_script(
                "const i = document.querySelector('[data-testid=mode-upload]'); return i.labels[0].textContent.trim()"),
            "me": text(driver, "#me")}
    assert seen["upload_button"] == "Envoyer un fichier", seen
    assert seen["me"].startswith("Connecté·e en tant que"), seen
    shot(driver, args, "1-form")
    axe(driver, args, "student-form-fr")
    q(driver, "[data-testid=mode-upload]").click()
    q(driver, "[data-testid=file-input]").send_keys(args.file)
    wait(driver, lambda: "Choisi" in text(driver, "[data-testid=file-status]"), what="the file check, in French")
    q(driver, "[data-testid=file-submit]").click()
    wait(driver, lambda: q(driver, "[data-testid=status]"), what="the live status")
    seen["status"] = text(driver, "[data-testid=status]")
    wait(driver, lambda: q(driver, "[data-testid=result]"), timeout=args.timeout, what="the released result")
    wait(driver, lambda: q(driver, "[data-testid=player]"), what="the media player")
    wait(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "[data-testid=player] track"), what="the captions track")
    seen["result_text"] = text(driver, "[data-testid=result]")
    seen["total"] = text(driver, "[data-testid=total]")
    seen["captions_lang"] = q(driver, "[data-testid=player] track").get_attribute("srclang")
    seen["transcript"] = text(driver, "[data-testid=transcript]")
    seen["unsure_marks"] = len(driver.find_elements(By.CSS_SELECTOR, "[data-testid=unsure-word]"))
    french_page(driver)
    shot(driver, args, "2-result")
    axe(driver, args, "student-result-fr")
    no_overflow(driver, 320, "student-result-fr")
    shot(driver, args, "2-result-320")
    no_overflow(driver, 1280, "student-result-fr")
    RESULT["seen"] = seen


def instructor_french(driver, args):
    open_app(driver, args, args.token, f"&assignment={args.assignment}&view=instructor")
    wait(driver, lambda: q(driver, "[data-testid=dashboard] table"), what="the dashboard table")
    seen = {"lang": french_page(driver), "tabs": [b.text for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]")]}
    assert "Grille et module" in seen["tabs"], seen
    shot(driver, args, "1-dashboard")
    axe(driver, args, "instructor-dashboard-fr")
    [b for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]") if b.text == "Grille et module"][0].click()
    wait(driver, lambda: q(driver, "[data-testid=assignment-language]"), what="the language menu")
    sel = q(driver, "[data-testid=assignment-language]")
    seen["language"] = sel.get_attribute("value")
    seen["language_text"] = driver.execute_script("const s = arguments[0]; return s.options[s.selectedIndex].text", sel)
    seen["vocabulary"] = q(driver, "[data-testid=assignment-vocabulary]").get_attribute("value")
    french_page(driver)
    shot(driver, args, "2-rubric")
    axe(driver, args, "instructor-rubric-fr")
    [b for b in driver.find_elements(By.CSS_SELECTOR, "[role=tab]") if b.text == "File d’attente"][0].click()
    wait(driver, lambda: q(driver, f"tr[data-submission='{args.submission}'] [data-testid=review]"), what="the row")
    q(driver, f"tr[data-submission='{args.submission}'] [data-testid=review]").click()
    wait(driver, lambda: q(driver, "[data-testid=override-form]"), what="the review screen")
    wait(driver, lambda: q(driver, "[data-testid=unsure-word]"), what="Whisper's unsure word")
    mark = q(driver, "[data-testid=unsure-word]")
    seen["unsure"] = driver.execute_script("return arguments[0].firstChild.textContent", mark)
    seen["unsure_title"] = mark.get_attribute("title")
    seen["unsure_help"] = text(driver, "[data-testid=unsure-help]")
    french_page(driver)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", mark)
    shot(driver, args, "3-review")
    axe(driver, args, "instructor-review-fr")
    RESULT["seen"] = seen


SCENARIOS = {
    "student-french": student_french,
    "instructor-french": instructor_french,
    "student-upload": student_upload,
    "student-record": student_record,
    "instructor-edit": instructor_edit,
    "instructor-review": instructor_review,
    "instructor-versions": instructor_versions,
    "instructor-calibration": instructor_calibration,
    "admin": admin,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--base", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--instructor-token")
    ap.add_argument("--submission")
    ap.add_argument("--criterion", default="content")
    ap.add_argument("--points", default="4")
    ap.add_argument("--select", default="", help="submission ids to select, comma-separated")
    ap.add_argument("--levels", default="", help="blind levels: criterion=level,…")
    ap.add_argument("--file")
    ap.add_argument("--audio", help="WAV for the fake microphone")
    ap.add_argument("--record-seconds", type=float, default=7)
    ap.add_argument("--axe", help="axe.min.js")
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=90)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--driver", default="/usr/bin/chromedriver")
    ap.add_argument("--lang", help="the browser's language, e.g. fr-FR")
    ap.add_argument("--assignment", default="sandbox-oral-1")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    def submission_hint():
        # The newest submission of this student, found through the API.
        subs = api(args, "GET", "/api/v1/assignments/sandbox-oral-1/submissions", args.token)
        return sorted(subs, key=lambda s: s["attempt"])[-1]["id"]

    args.submission_hint = submission_hint
    driver = make_driver(args, audio=args.audio, lang=args.lang)
    ok = False
    try:
        SCENARIOS[args.scenario](driver, args)
        errs = console_errors(driver)
        assert not errs, f"browser console errors: {errs}"
        ok = True
    except Exception as e:  # noqa: BLE001 - every failure is reported as JSON
        RESULT["error"] = f"{type(e).__name__}: {e}"[:4000]
        try:
            shot(driver, args, "failure")
            console_errors(driver)
            RESULT["page"] = driver.find_element(By.TAG_NAME, "body").text[:3000]
        except Exception:
            pass
    finally:
        driver.quit()
    RESULT["ok"] = ok
    print(json.dumps(RESULT))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
