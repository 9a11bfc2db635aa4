"""The playground page (GET /) in a real browser: Debian's chromium driven by Selenium.

Pick the base and two adapters, type a prompt, Run: the three answers stream side by side, each
equal to its greedy single-request answer, each with its tokens/s. Skipped, saying what to
install, where chromium or chromedriver is missing. The slow variant runs the embedded model and,
with LORAKIT_UPDATE_SCREENSHOT=1, refreshes docs/playground.png (the README's screenshot).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import lorakit_serve, serve_in_thread

CHROMIUM = os.environ.get("LORAKIT_CHROMIUM", "/usr/bin/chromium")          # Debian's packages by default
CHROMEDRIVER = os.environ.get("LORAKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "playground.png"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1400,900"]


@pytest.fixture
def browser():
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("the playground test needs a real browser: apt-get install -y chromium chromium-driver "
                    f"(looked for {CHROMIUM} and {CHROMEDRIVER})")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lorakit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def compare_in_page(driver, url, picks, prompt, max_tokens, key=None, timeout=120.0):
    """Drive the page; return {model: (text, stats line, text updates seen while streaming)}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # with a key, the browser logs in as a person would at the Basic prompt; the page's fetches reuse it
    driver.get(url.replace("http://", f"http://me:{key}@") + "/" if key else url + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) >= len(picks))
    for box in driver.find_elements(By.CSS_SELECTOR, "#models input"):
        if box.is_selected() != (box.get_attribute("value") in picks):
            box.click()
    driver.find_element(By.ID, "max_tokens").clear()
    driver.find_element(By.ID, "max_tokens").send_keys(str(max_tokens))
    driver.find_element(By.ID, "prompt").send_keys(prompt)
    driver.execute_script("""
        window.updates = {};
        new MutationObserver((records) => { for (const r of records) {
            const col = (r.target.nodeType === 1 ? r.target : r.target.parentElement).closest('.answer');
            if (col && (r.target.classList === undefined || r.target.classList.contains('text')))
                window.updates[col.dataset.model] = (window.updates[col.dataset.model] || 0) + 1; } })
          .observe(document.getElementById('answers'), {subtree: true, childList: true, characterData: true});""")
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer.done")) == len(picks))
    updates = driver.execute_script("return window.updates")
    out = {}
    for col in driver.find_elements(By.CSS_SELECTOR, ".answer"):
        model = col.get_attribute("data-model")
        out[model] = (col.find_element(By.CSS_SELECTOR, ".text").text, col.find_element(By.CSS_SELECTOR, ".stats").text,
                      updates.get(model, 0))
    return out


def test_playground_streams_adapters_side_by_side(browser, disk, oracle, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.models import load_tokenizer
    from lorakit.serving.app import create_app
    from lorakit.serving.server import Server

    picks = [disk["base"].name, "a", "b"]
    model = AutoModelForCausalLM.from_pretrained(disk["base"])
    server = Server(model, load_tokenizer(str(disk["base"])), disk["base"].name, {n: str(disk[n]) for n in "ab"})
    try:
        with serve_in_thread(create_app(server, api_key="pw")) as url:
            seen = compare_in_page(browser, url, picks, "hello", max_tokens=24, key="pw")
            browser.save_screenshot(str(tmp_path / "playground.png"))
    finally:
        server.stop()
    assert sorted(seen) == sorted(picks)
    messages = [{"role": "user", "content": "hello"}]
    for model, (text, stats, updates) in seen.items():
        want = oracle.text(None if model == disk["base"].name else model, messages, 24)
        assert text == want.strip() or text == want, model            # the page shows the greedy answer
        assert f"{len(oracle.ids(None if model == disk['base'].name else model, messages, 24))} tokens" in stats
        assert "tok/s" in stats and "first token" in stats
        assert updates > 1, f"{model}: the answer arrived in one piece, not streamed"
    assert (tmp_path / "playground.png").stat().st_size > 10_000


@pytest.mark.slow
def test_playground_on_the_embedded_model(browser, tmp_path):
    """The README's screenshot: the embedded model and two small adapters, side by side."""
    import torch

    import lorakit
    from lorakit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(None)
    for i, name in enumerate(("concise", "playful")):
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]), name=name)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".adapters.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if "lora_A" in pname else 0.01))
        lorakit.save_adapter(model, tmp_path / name, name=name)
    del model
    args = ["--lora-modules", f"concise={tmp_path / 'concise'}", f"playful={tmp_path / 'playful'}"]
    with lorakit_serve(args, timeout=300) as (url, _):
        seen = compare_in_page(browser, url, ["smollm2-135m-instruct", "concise", "playful"],
                               "Give me three tips for a good night's sleep.", max_tokens=64, timeout=600)
        time.sleep(0.2)
        out = DOCS if os.environ.get("LORAKIT_UPDATE_SCREENSHOT") == "1" else tmp_path / "playground.png"
        out.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(out))
    assert all(text and "tok/s" in stats and updates > 1 for text, stats, updates in seen.values())
    assert len({text for text, _, _ in seen.values()}) == 3          # the adapters answer differently
