"""LlamaBoard (`llamafactory-cli webui`) in a real headless Chromium: the OGPSA stages, end to end.

The stock LlamaBoard of the installed llamafactory runs in a subprocess on a free port, with the
tiny offline model and toy data of conftest; Selenium drives the page as a user would (labels,
dropdowns, the extra-arguments box, the OGPSA accordion, Start) and the assertions read what the
launched `llamafactory-cli train` wrote. Skipped when selenium, chromium or chromedriver is missing
(CI installs them best-effort in `.ci/run`). The default suite gets the page checks and one
training run (under a minute with the server's start); the failing run is in `-m long`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import BIN, ENV, REFS, log_history, ogpsa_log

from ogpsa.pipelines.integration.webui import widget_specs

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import (
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

OGPSA_SFT, OGPSA_DPO = "OGPSA Supervised Fine-Tuning", "OGPSA DPO"  # labels in the Stage dropdown
ACCORDION = "OGPSA configurations"  # the accordion of the ogpsa_* settings (English page)
# A tiny run: 4 steps of 4 samples, rebuild every 2. Stock LlamaBoard's own defaults (16 dataset
# workers, batch 2 x 8 accumulation, logging every 5 steps) would make it slow on a CPU.
EXTRA = {
    "ogpsa_reference": ",".join(REFS),
    "ogpsa_reference_samples": 8,
    "ogpsa_refresh_steps": 2,
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "cutoff_len": 128,
    "preprocessing_num_workers": None,
    "dataloader_num_workers": 0,
    "seed": 42,
}
WIDGETS = {spec.key: spec.kind for spec in widget_specs()}  # key -> dropdown, number, checkbox or text
STOCK = {k: v for k, v in EXTRA.items() if not k.startswith("ogpsa_")}  # the same run, settings elsewhere


def _browser_paths() -> tuple[str, str]:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"llamafactory-cli webui exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"LlamaBoard did not answer on {url} in {timeout} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """(url, working dir, log file) of a running `llamafactory-cli webui` (stock LlamaBoard)."""
    _browser_paths()  # skip before starting a server nobody can look at
    work = tmp_path_factory.mktemp("llamaboard")  # LlamaBoard writes saves/, llamaboard_cache/ here
    port = _free_port()
    env = {**os.environ, **ENV, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "0", "BROWSER": "true"}  # BROWSER: its inbrowser=True opens nothing
    log = work / "webui.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "llamafactory-cli"), "webui"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", proc, log)
        yield f"http://127.0.0.1:{port}/", work, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def driver():
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(arg)
    try:
        chrome = webdriver.Chrome(service=Service(chromedriver), options=options)
    except WebDriverException as e:  # e.g. a snap stub or a driver of another version: no usable browser
        pytest.skip(f"cannot start headless chromium: {e.msg}")
    chrome.implicitly_wait(0)
    yield chrome
    chrome.quit()


def _until(predicate, timeout: float, what: str, poll: float = 0.25):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = predicate()
        except StaleElementReferenceException:  # Gradio re-rendered the element meanwhile: look again
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Page:
    """The Train tab of LlamaBoard, found by the English labels a user reads."""

    def __init__(self, chrome, url: str):
        self.chrome = chrome
        chrome.get(url)
        # the page is filled by a load event (language, output dir): wait for the output box's "Ready."
        self.output_id = _until(self._find_output_box, 60, "the page's output box")

    def _find_output_box(self):
        for el in self.chrome.find_elements(By.XPATH, "//div[contains(@class,'prose')][normalize-space()='Ready.']"):
            block = el.find_element(By.XPATH, "./ancestor::div[starts-with(@id,'component-')][1]")
            return block.get_attribute("id")
        return None

    def _field(self, label: str, tag: str):
        xpath = (f"//span[@data-testid='block-info'][normalize-space()='{label}']"
                 f"/ancestor::div[starts-with(@id,'component-')][1]//{tag}")
        shown = lambda: next((el for el in self.chrome.find_elements(By.XPATH, xpath) if el.is_displayed()), None)
        return _until(shown, 10, f"the field {label!r}")  # an accordion shows its fields a moment after the click

    def choose(self, label: str, option: str) -> None:
        """Pick `option` in a dropdown: type to filter, click the exact entry."""
        box = self._field(label, "input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(option)
        _until(lambda: self._click_option(option), 10, f"option {option!r} of {label!r}")
        _until(lambda: box.get_attribute("value") == option or self.selected(label) == [option], 10,
               f"{label!r} = {option!r}")

    def _click_option(self, option: str) -> bool:
        found = self.chrome.find_elements(By.CSS_SELECTOR, f'ul[role="listbox"] li[aria-label="{option}"]')
        if found:
            found[0].click()
        return bool(found)

    def options(self, label: str) -> list[str]:
        """The entries a dropdown offers when the user opens it (LlamaBoard fills `Dataset` on focus)."""
        box = self._field(label, "input")
        box.click()
        end, names = time.time() + 3, []
        while not names and time.time() < end:  # the list renders a moment after the click; may be empty
            # read in one script: LlamaBoard may refill the list between two WebDriver calls
            names = self.chrome.execute_script(
                "return [...document.querySelectorAll('ul[role=listbox] li[role=option]')]"
                ".map(li => li.getAttribute('aria-label'))")
        box.send_keys(Keys.ESCAPE)
        # leave the field: a click on a focused dropdown neither reopens it nor makes LlamaBoard refill it
        self.chrome.execute_script("document.activeElement.blur()")
        return names

    def selected(self, label: str) -> list[str]:
        """The tokens of a multiselect dropdown."""
        block = self._field(label, "input").find_element(By.XPATH, "./ancestor::div[starts-with(@id,'component-')][1]")
        return [t.text.strip() for t in block.find_elements(By.CSS_SELECTOR, ".token > span")]

    def type(self, label: str, text: str, tag: str = "textarea") -> None:
        box = self._field(label, tag)
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        box.send_keys(text)

    def tick(self, label: str, on: bool) -> None:
        """Set a checkbox (its label is the text beside the box)."""
        xpath = f"//label[span[normalize-space()='{label}']]/input[@type='checkbox']"
        box = _until(lambda: next((el for el in self.chrome.find_elements(By.XPATH, xpath) if el.is_displayed()),
                                  None), 10, f"the checkbox {label!r}")
        if box.is_selected() != on:
            box.click()

    def _accordion(self, accordion: str) -> list:
        return self.chrome.find_elements(By.XPATH, f"//button[.//span[normalize-space()='{accordion}']]")

    def shown(self, accordion: str) -> bool:
        return any(button.is_displayed() for button in self._accordion(accordion))

    def open(self, accordion: str) -> None:
        """Open an accordion (a click on an open one would close it)."""
        _until(lambda: self.shown(accordion), 10, f"the accordion {accordion!r}")
        button = next(button for button in self._accordion(accordion) if button.is_displayed())
        if "open" not in button.get_attribute("class").split():
            button.click()

    def ogpsa(self, settings: dict) -> None:
        """Open the OGPSA accordion and set its widgets (labelled with the YAML keys)."""
        self.open(ACCORDION)
        for key, value in settings.items():
            kind = WIDGETS[key]
            if kind == "checkbox":
                self.tick(key, value)
            elif kind == "number":
                self.type(key, str(value), tag="input")
            elif kind == "dropdown":
                self.choose(key, value)
            else:
                self.type(key, value)
        self.chrome.execute_script("document.activeElement.blur()")  # a number box hands its value on blur

    def command(self) -> str:
        """The command LlamaBoard previews, or the error it shows instead (a new answer: the output box
        may hold the previous one)."""
        before = self.output()
        self.press("Preview command")

        def answered():
            output = self.output()
            # while the answer is pending Gradio lays its timer ("0.1s") over the previous text
            pending = re.match(r"^\d+(\.\d+)?s(\n|$)", output)
            return not pending and output != before and ("llamafactory-cli train" in output or "error" in output) and output

        return _until(answered, 30, "the command preview")

    def press(self, button: str) -> None:
        self.chrome.find_element(By.XPATH, f"//button[normalize-space()='{button}']").click()

    def output(self) -> str:
        return self.chrome.find_element(By.ID, self.output_id).text

    def dataset_choices(self, stage: str, data_dir: str, expected: list[str]) -> list[str]:
        """The Dataset entries for a stage, once LlamaBoard has refilled them (on focus, asynchronously):
        polled until they equal `expected` or 15 s pass, so a caller must vary `expected` from call to
        call to know the list was refilled for this stage."""
        self.choose("Stage", stage)
        self.type("Data dir", data_dir)
        end, names = time.time() + 15, []
        while time.time() < end and names != expected:
            names = sorted(self.options("Dataset"))
        return names

    def fill_run(self, tiny: dict[str, str], stage: str, dataset: str, extra: dict, compute: str = "fp32") -> None:
        """Model, stage, data and settings of a run, field by field as a user enters them."""
        self.choose("Model name", "Custom")
        self.choose("Finetuning method", "full")
        self.type("Model path", tiny["model"])
        self.choose("Chat template", "qwen")
        self.choose("Stage", stage)
        self.type("Data dir", tiny["data"])
        self.choose("Dataset", dataset)
        self.choose("Compute type", compute)
        self.open("Extra configurations")
        self.type("Extra arguments", json.dumps(extra))
        # a model name makes LlamaBoard reset path and template (asynchronously, also on page load):
        # set them again if that reset landed after them
        if self._field("Model path", "textarea").get_attribute("value") != tiny["model"]:
            self.type("Model path", tiny["model"])
        if self._field("Chat template", "input").get_attribute("value") != "qwen":
            self.choose("Chat template", "qwen")


def _full_page_screenshot(chrome, path: Path) -> None:
    """The whole page, not only the window (the stage row and the output box are far apart)."""
    width, height = chrome.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    shot = chrome.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 8000), "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.fixture
def page(board, driver, tmp_path, request):
    """A fresh Train tab; its screenshot at the end (pass or fail) goes to tmp_path and, when set,
    to $OGPSA_TEST_ARTIFACTS."""
    yield Page(driver, board[0])
    name = "llamaboard_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name) + ".png"
    _full_page_screenshot(driver, tmp_path / name)
    if os.environ.get("OGPSA_TEST_ARTIFACTS"):
        dest = Path(os.environ["OGPSA_TEST_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, dest / name)


def test_stage_list_and_dataset_filter(page, tiny):
    """Both OGPSA stages are offered; ogpsa_dpo lists preference data only, ogpsa_sft the rest, as dpo/sft."""
    stages = page.options("Stage")
    assert {OGPSA_SFT, OGPSA_DPO} <= set(stages) and "DPO" in stages
    info = json.loads((Path(tiny["data"]) / "dataset_info.json").read_text())
    ranking = sorted(name for name, entry in info.items() if entry.get("ranking"))
    plain = sorted(set(info) - set(ranking))
    assert ranking == ["toy_safety_dpo"] and "toy_safety_sft" in plain
    # alternate the expected lists: each answer then comes from a refill for that very stage
    for stage, expected in ((OGPSA_DPO, ranking), (OGPSA_SFT, plain), ("DPO", ranking),
                            ("Supervised Fine-Tuning", plain)):
        assert page.dataset_choices(stage, tiny["data"], expected) == expected, stage


def test_ogpsa_dpo_command_keeps_the_pages_dpo_settings(page, tiny):
    """OGPSA DPO is built as DPO (beta, ftx and loss from the page's RLHF fields), then named ogpsa_dpo."""
    page.fill_run(tiny, OGPSA_DPO, "toy_safety_dpo", EXTRA)
    page.open("RLHF configurations")
    page.choose("Loss type", "ipo")
    page.press("Preview command")
    command = _until(lambda: "llamafactory-cli train" in page.output() and page.output(), 30, "the command preview")
    for flag in ("--stage ogpsa_dpo", "--dataset toy_safety_dpo", "--pref_loss ipo", "--pref_beta 0.1",
                 f"--ogpsa_reference {EXTRA['ogpsa_reference']}", "--ogpsa_refresh_steps 2"):
        assert flag in command, (flag, command)


def test_ogpsa_accordion_reaches_the_command(page, tiny):
    """The accordion shows for the OGPSA stages only. Widgets a user sets reach the command (a false
    checkbox as `false`, which LlamaBoard would otherwise drop), those left alone add nothing, the
    JSON box has the last word on a key set in both, and a bad widget value shows its one-line error."""
    page.choose("Stage", "Supervised Fine-Tuning")
    assert not page.shown(ACCORDION)
    page.fill_run(tiny, OGPSA_DPO, "toy_safety_dpo", {**STOCK, "ogpsa_reference_samples": 8})
    assert page.shown(ACCORDION)
    page.ogpsa({"ogpsa_reference": ",".join(REFS), "ogpsa_refresh_steps": 3, "ogpsa_mode": "conflict",
                "ogpsa_keep_previous": False, "ogpsa_reference_samples": 50})
    command = page.command()
    for flag in ("--stage ogpsa_dpo", f"--ogpsa_reference {','.join(REFS)} ", "--ogpsa_refresh_steps 3 ",
                 "--ogpsa_mode conflict ", "--ogpsa_keep_previous false ", "--ogpsa_reference_samples 8 "):
        assert flag in command, (flag, command)
    set_here = {"ogpsa_reference", "ogpsa_refresh_steps", "ogpsa_mode", "ogpsa_keep_previous", "ogpsa_reference_samples"}
    assert sorted(re.findall(r"--(ogpsa_\w+) ", command)) == sorted(set_here)  # the untouched ones add nothing
    if os.environ.get("OGPSA_TEST_ARTIFACTS"):  # the picture in docs/guide.md
        block = page.chrome.find_element(
            By.XPATH, f"//button[.//span[normalize-space()='{ACCORDION}']]/ancestor::div[starts-with(@id,'component-')][1]")
        hide = "document.querySelectorAll('.toast-wrap').forEach(t => t.style.visibility = arguments[0])"
        page.chrome.execute_script(hide, "hidden")  # LlamaBoard's pop-up warnings, not part of the accordion
        page.chrome.execute_script("arguments[0].scrollIntoView()", block)
        Path(os.environ["OGPSA_TEST_ARTIFACTS"], "llamaboard_ogpsa_accordion.png").write_bytes(block.screenshot_as_png)
        page.chrome.execute_script(hide, "")
    page.ogpsa({"ogpsa_directions_per_set": 9})  # more groups than the 8 samples the JSON box gives
    message = "ogpsa: error: ogpsa_directions_per_set: 9 groups need at least as many samples per set, but " \
              "ogpsa_reference_samples is 8"
    assert message in page.command()
    page.choose("Stage", "DPO")
    _until(lambda: not page.shown(ACCORDION), 10, "the accordion to hide for a stock stage")


@pytest.mark.parametrize("case", ["unknown_key", "page_field"])
def test_bad_settings_show_error_and_start_nothing(board, page, tiny, case):
    """The checks of `llamafactory-cli train` run on Start: one line on the page, nothing launched."""
    work = board[1]
    if case == "unknown_key":
        page.fill_run(tiny, OGPSA_SFT, "toy_safety_sft", {**EXTRA, "ogpsa_refresh": 3})
        message = "ogpsa: error: ogpsa_refresh: unknown OGPSA key"
    else:  # a stock field of the page that OGPSA cannot work with: pure bf16 weights and target=update
        page.fill_run(tiny, OGPSA_SFT, "toy_safety_sft", EXTRA, compute="pure_bf16")
        message = "ogpsa: error: pure_bf16: bf16 weights cannot resolve a small step"
    before = sorted(p.name for p in (work / "saves").glob("*/*/*"))
    page.press("Start")
    _until(lambda: message in page.output(), 30, f"the error {message!r} on the page")
    assert sorted(p.name for p in (work / "saves").glob("*/*/*")) == before  # no output dir: nothing started


def _run_dirs(work: Path) -> set[Path]:
    """Output dirs LlamaBoard made for launched runs (it writes training_args.yaml, then launches)."""
    return {p.parent for p in (work / "saves").glob("*/*/*/training_args.yaml")}


def _run_on_page(page, work: Path) -> Path:
    """Press Start, wait for the page to report the end; the run's output dir."""
    before = _run_dirs(work)
    page.press("Start")
    _until(lambda: page.output().startswith(("Finished.", "Failed.")), 300, "the run to end", poll=1)
    (out,) = _run_dirs(work) - before
    return out


@pytest.mark.long  # a second launched run (~16 s): kept out of the default suite's 15-minute budget
def test_error_found_by_the_run_fails_it_on_the_page(board, page, tiny, tmp_path):
    """What only the launched run can find (an empty reference set) ends it with exit code 2 and its
    one-line error, no traceback, on the page."""
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "empty_ref": {"file_name": "empty_ref.json"}}))
    (data / "empty_ref.json").write_text("[]")
    extra = {**EXTRA, "ogpsa_reference": "toy_math_ref,empty_ref"}
    page.fill_run({**tiny, "data": str(data)}, OGPSA_SFT, "toy_safety_sft", extra)
    out = _run_on_page(page, board[1])
    output = page.output()
    assert output.startswith("Failed. Exit code: 2"), output[:3000]
    assert "ogpsa: error: ogpsa_reference: reference set 'empty_ref' is empty" in output
    assert "Traceback" not in output and not (out / "ogpsa_log.jsonl").exists()


def test_page_trains_ogpsa_sft(board, page, tiny):
    """Start on the page with the settings in the OGPSA accordion: the launched run projects, logs its
    rebuilds at the accordion's refresh steps, and the page reports success."""
    page.fill_run(tiny, OGPSA_SFT, "toy_safety_sft", STOCK)
    page.ogpsa({k: v for k, v in EXTRA.items() if k.startswith("ogpsa_")})
    out = _run_on_page(page, board[1])
    assert page.output().startswith("Finished."), f"{page.output()[-3000:]}\n{board[2].read_text()[-3000:]}"
    launched = yaml.safe_load((out / "training_args.yaml").read_text())  # the file LlamaBoard launched
    assert launched["stage"] == "ogpsa_sft"
    assert {k: v for k, v in launched.items() if k.startswith("ogpsa_")} == {
        "ogpsa_reference": ",".join(REFS), "ogpsa_reference_samples": 8, "ogpsa_refresh_steps": 2}
    records = ogpsa_log(out)
    rebuilds = [r for r in records if r.get("event") == "rebuild"]
    assert [r["step"] for r in rebuilds] == [0, 2]  # at the start, then every ogpsa_refresh_steps=2
    assert all(r[f"grad_norm/{n}"] > 0 for r in rebuilds for n in REFS)
    steps = [r for r in records if "removed_fraction" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert 0.0 < r["removed_fraction"] < 1.0  # the projection removed part of each gradient
        assert all(abs(r[f"cos_after/{n}"]) < 1e-4 for n in REFS)  # ...and what is left is orthogonal
    history = [h for h in log_history(out) if "loss" in h]
    assert len(history) == 4 and all("ogpsa/removed_fraction" in h for h in history)
