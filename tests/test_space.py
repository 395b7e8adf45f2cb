"""The Space app (space/app.py) in a real browser: headless Chromium, driven through chromedriver by Selenium,
against the app served by Gradio on the demo model. Upload a generated video, ask, see the decoding progress bar,
read the answer as it streams (it must arrive in more than one piece and equal the model's own greedy answer),
upload an image, ask with nothing uploaded. Every toast the page shows is recorded from the moment it opens: an error
toast fails the test (the one that asking with nothing uploaded must show excepted). A screenshot of the answered
page is kept in $VAMBA_HF_ARTIFACTS (default: artifacts/ under pytest's base temporary folder).

Needs gradio and selenium in the environment and Chromium with its driver (Debian: `apt-get install chromium
chromium-driver`); without them the tests skip, saying which is missing, or fail when VAMBA_HF_REQUIRE_BROWSER=1."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1300"]
START_TIMEOUT_S = 180
ANSWER_TIMEOUT_S = 120
# Records every distinct value the answer box takes, every 5 ms, in the page itself (a Python-side poll over the
# WebDriver protocol is too slow to see a short answer's pieces), and whether the decoding progress bar showed.
RECORD_ANSWERS = r"""
window.vambaAnswers = [];
window.vambaSawProgress = false;
window.vambaRecorder = setInterval(() => {
  const box = document.querySelector('#answer textarea');
  const value = box ? box.value : '';
  const seen = window.vambaAnswers;
  if (seen.length === 0 || seen[seen.length - 1] !== value) seen.push(value);
  const status = document.querySelector('#answer');
  if (status && /decoding \S+ - \d+(\.\d+)?%/i.test(status.innerText)) window.vambaSawProgress = true;
}, 5);
"""
# Records every toast the page shows (its type is in its class: "toast-body error"), as the page adds it.
RECORD_TOASTS = """
window.vambaToasts = [];
const record = () => document.querySelectorAll('[data-testid="toast-body"]').forEach(toast => {
  const entry = toast.className + ': ' + toast.innerText.replace(/\\s+/g, ' ').trim();
  if (!window.vambaToasts.includes(entry)) window.vambaToasts.push(entry);
});
new MutationObserver(record).observe(document.body, {childList: true, subtree: true, characterData: true});
"""


def missing_requirements() -> list:
    missing = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
    if chromium_binary() is None:
        missing.append("chromium (apt-get install chromium)")
    if shutil.which("chromedriver") is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    return missing


def chromium_binary():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


MISSING = missing_requirements()
if MISSING and os.environ.get("VAMBA_HF_REQUIRE_BROWSER") == "1":  # CI sets it: a skip there would hide a failure
    pytest.fail(f"VAMBA_HF_REQUIRE_BROWSER=1 but the Space browser test lacks {', '.join(MISSING)}", pytrace=False)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"SPACE BROWSER TEST SKIPPED: missing {', '.join(MISSING)}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("space-demo-cache")


@pytest.fixture(scope="module")
def app_url(demo_cache, tmp_path_factory):
    port = free_port()
    python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, PYTHONPATH=python_path, VAMBA_HF_CACHE=str(demo_cache), GRADIO_SERVER_PORT=str(port),
                       GRADIO_SERVER_NAME="127.0.0.1", GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                       CUDA_VISIBLE_DEVICES="")
    environment.pop("VAMBA_MODEL", None)
    log = tmp_path_factory.mktemp("space-log") / "app.log"
    with open(log, "w") as output:
        server = subprocess.Popen([sys.executable, str(REPO / "space" / "app.py")], env=environment, stdout=output,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, server, log)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_until_served(url: str, server, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited with status {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer at {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium_binary()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("VAMBA_HF_ARTIFACTS") or tmp_path_factory.getbasetemp() / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    from vamba_hf.demo import write_demo_video

    folder = tmp_path_factory.mktemp("space-media")
    Image.new("RGB", (96, 64), (200, 40, 40)).save(folder / "picture.png")
    # The sample video users make (examples/make_sample_video.py), H.264 in MP4, so the page must preview it.
    # 1,500 small frames: about a second to decode, long enough for the progress bar to be seen.
    video = write_demo_video(folder / "clip.mp4", num_frames=1500)
    return {"video": video, "image": folder / "picture.png"}


def open_page(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#ask")))
    browser.execute_script(RECORD_TOASTS)


def error_toasts(browser) -> list:
    """The error toasts the page has shown since `open_page`."""
    return [toast for toast in browser.execute_script("return window.vambaToasts;") if " error" in toast.split(":")[0]]


def ask(browser, question: str, upload=None, element=None):
    """Upload `upload` into the component `element` (if any), type the question, press Ask; returns when the
    answer box has stopped changing for a second (or the page shows an error)."""
    from selenium.webdriver.common.by import By

    if upload is not None:
        browser.find_element(By.CSS_SELECTOR, f"#{element} input[type=file]").send_keys(str(upload))
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, f"#{element} video, #{element} img"), "the upload")
    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    browser.execute_script(RECORD_ANSWERS)
    browser.find_element(By.CSS_SELECTOR, "#ask").click()


def wait_for(condition, what: str, timeout: float = ANSWER_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def finished_answers(browser) -> list:
    """The distinct values the answer box took, once it has held a non-empty value unchanged for 2 s."""
    def settled():
        seen = browser.execute_script("return window.vambaAnswers;")
        if seen and seen[-1]:
            time.sleep(2)
            if browser.execute_script("return window.vambaAnswers;") == seen:
                return seen
        return None

    seen = wait_for(settled, "the answer")
    browser.execute_script("clearInterval(window.vambaRecorder);")
    return [value for value in seen if value]


def expected_answer(demo_cache, video, frames: int) -> str:
    """The demo model's greedy answer computed here, without the app: what the page must end up showing."""
    import torch

    from space_app import MAX_NEW_TOKENS
    from vamba_hf.inference import build_messages, load_model_and_processor, new_text, prepare_inputs, printable

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAMBA_HF_CACHE", str(demo_cache))
        loaded = load_model_and_processor(None, device="cpu")
    inputs = prepare_inputs(loaded.processor, build_messages("What moves?", video=str(video)), loaded.model.device,
                            num_frames=frames)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return printable(new_text(loaded.processor, output, inputs)[0])


@pytest.fixture(scope="module", autouse=True)
def space_module_importable():
    sys.path.insert(0, str(REPO / "space"))
    sys.modules.pop("space_app", None)
    spec = importlib.util.spec_from_file_location("space_app", REPO / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["space_app"] = module
    yield
    sys.path.remove(str(REPO / "space"))


def test_video_question_streams_the_model_s_answer(app_url, browser, media, demo_cache, artifacts):
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    assert "random weights" in browser.find_element(By.TAG_NAME, "body").text  # the demo model says it is one
    frames = int(browser.find_element(By.CSS_SELECTOR, "#frames input[type=number]").get_attribute("value"))
    ask(browser, "What moves?", media["video"], "video")
    pieces = finished_answers(browser)
    assert browser.execute_script("return window.vambaSawProgress;"), "no decoding progress was shown"
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "Error" not in page and "not playable" not in page, page
    assert not error_toasts(browser), error_toasts(browser)
    screenshot = artifacts / "space-video-answer.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert len(pieces) >= 2, f"the answer arrived in one piece, not streamed: {pieces}"
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:])), pieces
    assert pieces[-1] == expected_answer(demo_cache, media["video"], frames)
    assert all(character.isprintable() or character in "\n\t" for character in pieces[-1])
    assert screenshot.stat().st_size > 10_000


def test_image_question_is_answered(app_url, browser, media):
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    ask(browser, "What color is it?", media["image"], "image")
    assert finished_answers(browser)[-1].strip()
    assert "Error" not in browser.find_element(By.TAG_NAME, "body").text
    assert not error_toasts(browser), error_toasts(browser)


def test_asking_with_nothing_uploaded_says_what_to_do(app_url, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, app_url)
    ask(browser, "Anything?")
    wait_for(lambda: "Upload a video or an image first." in browser.find_element(By.TAG_NAME, "body").text,
             "the error message", timeout=30)
    (toast,) = wait_for(lambda: error_toasts(browser), "the error toast", timeout=30)  # the recorder sees errors
    assert "Upload a video or an image first." in toast


def test_the_space_asks_for_the_pillow_its_gradio_accepts():
    """`pip install gradio` moves Pillow to what gradio accepts: requirements.txt asks for no Pillow outside it."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    space_pillow = next(Requirement(line) for line in (REPO / "space" / "requirements.txt").read_text().splitlines()
                        if line.startswith("pillow"))
    gradio_pillow = next(Requirement(line) for line in importlib.metadata.requires("gradio")
                         if Requirement(line).name.lower() == "pillow" and not Requirement(line).marker)
    for bound in gradio_pillow.specifier:
        assert any(mine.operator == bound.operator and (Version(mine.version) >= Version(bound.version)
                                                        if ">" in bound.operator else
                                                        Version(mine.version) <= Version(bound.version))
                   for mine in space_pillow.specifier), (str(space_pillow), str(gradio_pillow))
    assert importlib.metadata.version("pillow") in space_pillow.specifier
