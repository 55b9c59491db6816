"""The web console end to end in a real browser: Debian's chromium, driven by Selenium through chromedriver.

The services run the shipped models (models/), so the page shows what users see; the screenshots the
README shows come from here (``make screenshots`` writes them to docs/images/). Skipped only when
chromium or chromedriver is not installed (``apt-get install chromium chromium-driver``; CI installs them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.helpers import ROOT, ServiceProcess, metric_value, start_service
from tests.test_console import ConsoleProcess, start_console

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
)
MODELS = ROOT / "models"


def served(name: str) -> str:
    """``name/version`` of the version the services serve: the highest shipped one."""
    from services.core.repository import ModelRepository

    return f"{name}/{ModelRepository(MODELS).versions(name)[-1]}"


WAIT_S = 120  # a bound on a hang, never a timing assertion


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConsoleProcess, ServiceProcess]]:
    """The three services on the shipped models, and the console in front of them."""
    work = tmp_path_factory.mktemp("browser")
    servers: list[ServiceProcess] = []
    console = None
    try:
        for name in ("classify", "restore", "generate"):
            servers.append(start_service(f"services.{name}", MODELS, work / name))
        console = start_console(work / "console", *(s.address for s in servers))
        yield console, servers[2]
    finally:
        if console is not None:
            console.stop()
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def browser(suite: tuple[ConsoleProcess, ServiceProcess]) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1180,1300"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=str(CHROMEDRIVER)))
    try:
        driver.get(suite[0].url + "/")
        yield driver
        uncaught = [e for e in driver.get_log("browser") if e.get("source") == "javascript"]
        assert not uncaught, f"the page raised: {uncaught}"
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $NNSERVE_CONSOLE_SCREENSHOTS (make screenshots: docs/images) or a temp dir."""
    target = os.environ.get("NNSERVE_CONSOLE_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait(driver: WebDriver, condition: Any, message: str) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message)


def screenshot(driver: WebDriver, element_id: str, path: Path) -> None:
    element = driver.find_element(By.ID, element_id)
    driver.execute_script("arguments[0].scrollIntoView()", element)
    element.screenshot(str(path))
    assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 2000


def visible(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_element(By.ID, element_id).is_displayed())


def set_value(driver: WebDriver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def draw(driver: WebDriver, element_id: str, *moves: tuple[int, int]) -> None:
    """A stroke through ``moves`` (offsets from the element's centre, then relative steps)."""
    canvas = driver.find_element(By.ID, element_id)
    actions = ActionChains(driver).move_to_element_with_offset(canvas, *moves[0]).click_and_hold()
    for dx, dy in moves[1:]:
        actions = actions.move_by_offset(dx, dy)
    actions.release().perform()


def test_status_strip_shows_every_service_and_model(browser: WebDriver, shots: Path) -> None:
    pills = wait(
        browser,
        lambda d: (p := d.find_elements(By.CSS_SELECTOR, "#status .pill[data-health=SERVING]")) and len(p) == 3 and p,
        "three SERVING services in the status strip",
    )
    text = " ".join(p.text for p in pills)
    for model in ("classifier", "autoencoder", "gan_generator", "diffusion_denoiser"):
        assert served(model) in text
    screenshot(browser, "top", shots / "console_status.png")


def test_classify_a_drawing_and_an_example(browser: WebDriver, shots: Path) -> None:
    draw(browser, "classify-canvas", (-40, -70), (0, 130), (80, 0), (0, -130))
    browser.find_element(By.ID, "classify-draw").click()
    wait(browser, lambda d: d.find_element(By.ID, "classify").get_attribute("data-state") == "done", "a result")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#classify-bars li")) == 5
    drawing = browser.find_element(By.ID, "classify-input").get_attribute("src")
    browser.find_element(By.CSS_SELECTOR, '#classify-examples button[data-example="bag"]').click()
    # The page sets the input picture and the bars together, once the reply is in.
    wait(browser, lambda d: d.find_element(By.ID, "classify-input").get_attribute("src") != drawing, "the reply")
    top = browser.find_element(By.CSS_SELECTOR, "#classify-bars li").get_attribute("data-label")
    assert top == "Bag"  # the shipped classifier: Bag 95.9%
    assert "in distribution" in browser.find_element(By.ID, "classify-ood").text
    assert browser.find_element(By.ID, "classify-model").text == served("classifier")
    screenshot(browser, "classify", shots / "console_classify.png")


def test_restore_an_example_with_noise_and_a_mask(browser: WebDriver, shots: Path) -> None:
    browser.find_element(By.CSS_SELECTOR, '#restore-examples button[data-example="shirt"]').click()
    draw(browser, "restore-mask", (-30, 20), (50, 0), (0, 20))
    browser.find_element(By.ID, "restore-run").click()
    wait(browser, lambda d: d.find_element(By.ID, "restore").get_attribute("data-state") in ("done", "error"), "")
    assert not visible(browser, "restore-error"), browser.find_element(By.ID, "restore-error").text
    for part in ("input", "damaged", "restored"):
        assert browser.find_element(By.ID, f"restore-{part}").get_attribute("src").startswith("data:image/png;base64,")
    assert "anomaly score" in browser.find_element(By.ID, "restore-score").text
    summary = browser.find_element(By.ID, "restore-model").text
    assert summary.startswith(served("autoencoder")) and "noise σ 0.30" in summary and "masked pixels" in summary
    screenshot(browser, "restore", shots / "console_restore.png")


def generate(browser: WebDriver, model: str, label: str, count: str, steps: str) -> None:
    Select(browser.find_element(By.ID, "generate-model")).select_by_value(model)
    Select(browser.find_element(By.ID, "generate-label")).select_by_value(label)
    set_value(browser, "generate-count", count)
    set_value(browser, "generate-steps", steps)
    set_value(browser, "generate-seed", "1")
    browser.find_element(By.ID, "generate-run").click()


def test_generate_a_diffusion_grid_live(browser: WebDriver, shots: Path) -> None:
    generate(browser, "diffusion", "3", "16", "50")
    step = lambda d: int(d.find_element(By.ID, "generate-progress").get_attribute("data-step"))  # noqa: E731
    wait(browser, lambda d: step(d) >= 20, "step 20")
    screenshot(browser, "generate", shots / "console_generate_live.png")  # whichever step it shows by now
    wait(browser, lambda d: step(d) == 50 and visible(d, "generate-result"), "step 50 and the grid")
    assert browser.find_element(By.ID, "generate-progress").get_attribute("data-total") == "50"
    # An x0 preview every 5 steps; the last one gave way to the result.
    assert browser.find_element(By.ID, "generate-preview").get_attribute("data-previews") == "10"
    assert not visible(browser, "generate-preview")
    summary = browser.find_element(By.ID, "generate-summary").text
    assert summary.startswith("diffusion_denoiser/1, seed 1") and "16 × Dress" in summary
    screenshot(browser, "generate", shots / "console_generate.png")


def test_gan_grid(browser: WebDriver) -> None:
    generate(browser, "gan", "7", "9", "50")
    gan = served("gan_generator")
    wait(browser, lambda d: gan in d.find_element(By.ID, "generate-summary").text, "the GAN grid")
    assert "9 × Sneaker" in browser.find_element(By.ID, "generate-summary").text


def test_stop_cancels_sampling_on_the_generate_service(
    browser: WebDriver, suite: tuple[ConsoleProcess, ServiceProcess]
) -> None:
    console, generate_server = suite

    def cancelled() -> float:
        text = generate_server.metrics_text()
        return metric_value(text, "nnserve_batch_rejected_total", model="diffusion_denoiser", reason="cancelled")

    before = cancelled()
    generate(browser, "diffusion", "", "32", "1000")  # 64,000 denoiser rows: minutes of work
    wait(browser, lambda d: int(d.find_element(By.ID, "generate-progress").get_attribute("data-step")) >= 2, "steps")
    browser.find_element(By.ID, "generate-stop").click()
    wait(browser, lambda d: "stopped" in d.find_element(By.ID, "generate-progress").text, "the page to say stopped")
    assert int(browser.find_element(By.ID, "generate-progress").get_attribute("data-step")) < 1000
    WebDriverWait(browser, WAIT_S, poll_frequency=0.2).until(lambda _: cancelled() == before + 1, "server cancel")
    stopped = metric_value(console.metrics_text(), "nnserve_console_generate_streams_total", outcome="stopped")
    assert stopped == 1 and browser.find_element(By.ID, "generate-run").is_enabled()


def test_service_errors_show_as_messages(browser: WebDriver, tmp_path: Path) -> None:
    generate(browser, "diffusion", "", "4", "5000")
    error = wait(browser, lambda d: visible(d, "generate-error") and d.find_element(By.ID, "generate-error"), "")
    assert "HTTP 400: generate: INVALID_ARGUMENT: diffusion.steps: 5000 is out of range (1..1000)" in error.text
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"not an image at all")
    browser.find_element(By.ID, "classify-file").send_keys(str(not_an_image))
    error = wait(browser, lambda d: visible(d, "classify-error") and d.find_element(By.ID, "classify-error"), "")
    assert "HTTP 400: classify: INVALID_ARGUMENT: images[0]" in error.text
    browser.find_element(By.ID, "restore-file").send_keys(str(not_an_image))
    error = wait(browser, lambda d: visible(d, "restore-error") and d.find_element(By.ID, "restore-error"), "")
    assert "notes.png: the browser cannot read this file as an image" in error.text
