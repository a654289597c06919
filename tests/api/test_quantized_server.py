"""The real server in the quantised mode (--quantization q4) on a tiny LLaMA: prefix, prompt-tuning, LoRA and bare
rows served together over HTTP, each equal to itself alone; a model the mode cannot run is refused at start."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from server.engine import kernels
from tests.api.conftest import peft_adapter, start_server, stop_server
from prefix_store.peft_io import read_dir
from tests.tiny import gpt2_tokenizer, save_lora_adapter, save_tiny_model_dir

pytestmark = pytest.mark.skipif(bool(kernels.missing_cpu_flags()), reason="the CPU lacks AVX2/FMA/F16C")


@pytest.fixture(scope="module")
def q4_server(tmp_path_factory):
    path = save_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama", seed=0)
    gpt2_tokenizer().save_pretrained(path)
    s = start_server(path, tmp_path_factory.mktemp("q4"), quantization="q4", max_batch_size=8, max_seq_len=256)
    yield s
    stop_server(s)


def test_ready_says_q4_and_rows_with_tasks_equal_alone(q4_server, tmp_path):
    """Prefix, prompt-tuning, LoRA and bare rows over HTTP: together, each gives the ids it gives alone."""
    with q4_server.client() as c:
        assert c.get("/ready").json()["quantization"] == "q4"
        lora = read_dir(save_lora_adapter("llama", tmp_path / "lora", r=4, seed=1))
        for name, files in [("pre", peft_adapter("llama", tokens=6, seed=1)),
                            ("soft", peft_adapter("llama", tokens=4, seed=2, prompt_tuning=True)), ("lo", lora)]:
            r = c.put(f"/prefixes/{name}", files=[("files", (n, b)) for n, b in files.items()])
            assert r.status_code in (200, 201), r.text
        jobs = [(task, prompt) for task in ("pre", "soft", "lo", None)
                for prompt in ("The quick brown fox", "Hello", "Once upon a time there was")]

        def ask(job):
            task, prompt = job
            r = c.post("/generate" + (f"?task={task}" if task else ""),
                       json={"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}})
            assert r.status_code == 200, r.text
            return [t["id"] for t in r.json()["details"]["tokens"]]

        alone = [ask(j) for j in jobs]
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = list(pool.map(ask, jobs))
        assert together == alone
        assert len({tuple(a) for a in alone}) == len(jobs)  # tasks change what rows say
        r = c.post("/v1/completions", json={"model": "pre", "prompt": "Hello", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_q4_on_a_model_it_cannot_run_is_refused_at_start(tmp_path):
    path = save_tiny_model_dir("gpt2", tmp_path / "tiny-gpt2", seed=0)
    with pytest.raises(RuntimeError, match="gpt2"):
        s = start_server(path, tmp_path, quantization="q4")
        stop_server(s)
