"""CUDA-only checks (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere)."""

import pytest
import torch
from conftest import base_config, log_history, ogpsa_keys, ogpsa_log, run_cli

from ogpsa.plugin.projection import build_basis, project_, residual_cosines

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SHAPES = [(896, 896), (4864, 896), (896,), (151936 // 16, 896)]


def grads(gen, dtype):
    return [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in SHAPES]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_projection_on_cuda(dtype, tol, granularity):
    gen = torch.Generator(device="cuda").manual_seed(0)
    refs = [grads(gen, dtype) for _ in range(3)]
    basis = build_basis(refs, granularity)
    assert all(d.device.type == "cuda" and d.dtype == dtype for d in basis.directions)
    g = grads(gen, dtype)
    project_(g, basis)
    assert max(abs(c) for c in residual_cosines(g, refs)) < tol


def test_no_host_device_copy_inside_the_step():
    """The projection reads the basis where it lives: no HtoD/DtoH memcpy but the one metrics sync."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(1)
    refs = [grads(gen, torch.bfloat16) for _ in range(3)]
    basis = build_basis(refs, "tensor")
    g = grads(gen, torch.bfloat16)
    project_(g, basis)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        project_(g, basis)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    htod = [n for n in names if "Memcpy HtoD" in n]
    dtoh = [n for n in names if "Memcpy DtoH" in n]
    print(f"memcpy HtoD: {len(htod)}, DtoH: {len(dtoh)}")
    assert len(htod) == 0
    assert len(dtoh) <= 1  # the single .tolist() of the packed metrics


def test_ogpsa_sft_bf16_on_gpu(tiny, tmp_path):
    out = tmp_path / "out"
    cfg = base_config(tiny, out, max_steps=4, bf16=True, **ogpsa_keys(ogpsa_refresh_steps=2))
    run_cli(cfg, tmp_path / "run")
    history = [h for h in log_history(out) if "loss" in h]
    assert all(0 < h["ogpsa/removed_fraction"] < 1 and abs(h["ogpsa/cos_after/toy_math_ref"]) < 1e-2 for h in history)
    assert [r["step"] for r in ogpsa_log(out) if r.get("event") == "rebuild"] == [0, 2]
