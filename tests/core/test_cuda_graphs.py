"""The UNet step replayed as CUDA graphs (core/cuda_graphs.py), driven on the CPU with a stand-in for the two
captures that has CUDA-graph buffer semantics: a replay recomputes the captured function on the *static*
buffers and writes into the *static* output, so a wrapper that forgot to copy its inputs in, or handed out the
static output itself, gives wrong numbers here as it would on a GPU. The CUDA kernels themselves run only on
a device (scripts/gpu_bench.sh)."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from core import cuda_graphs as cg
from core import speed
from core.msi import MSIOptions, train_msi
from core.sampling import SamplingOptions, ddim_invert, protect, recover_latent
from core.schedules import EmbeddingSchedule
from tests.support import tiny_diffusers as td
from tests.support.fake_graphs import FakeGraphOps
from tests.support.toy_models import toy_face_image


class ToyStep(nn.Module):
    """ε̂(z, t, cond): depends on all three inputs, with frozen weights."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.proj = nn.Linear(8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.requires_grad_(False)

    def forward(self, z, t, cond):
        bias = self.proj(cond.mean(1)) + (t.float() / 1000.0).view(-1, 1)
        return torch.tanh(self.conv(z)) + bias.view(-1, 4, 1, 1)


def make_steps(model, setting="auto", ops=None, free=64 * 2 ** 30, **kw):
    return cg.CudaGraphSteps(model, "cpu", setting, weights=lambda: (*model.parameters(), *model.buffers()),
                             ops=ops if ops is not None else FakeGraphOps(), free_bytes=lambda: free, **kw)


def inputs(i, batch=2, grad=False):
    g = torch.Generator().manual_seed(100 + i)
    z = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 37 * i + 1, dtype=torch.long)
    cond = torch.randn(batch, 77, 8, generator=g).requires_grad_(grad)
    return z, t, cond


# ------------------------------------------------------------------------------------------ switch logic
def test_off_where_graphs_cannot_run(monkeypatch):
    model = ToyStep()
    plain = cg.CudaGraphSteps(model, "cpu", "auto", weights=model.parameters)
    assert plain.reason.startswith("off: CUDA graphs need a CUDA device")
    with plain.scope():
        assert not plain.active
        assert torch.equal(plain(*inputs(0)), model(*inputs(0)))
    assert make_steps(model, "off").reason == "off (set explicitly)"
    monkeypatch.setenv("DP_CUDA_GRAPHS", "0")
    assert make_steps(model).reason == "off: DP_CUDA_GRAPHS=0 is set"
    with pytest.raises(ValueError, match="cuda_graphs must be one of"):
        make_steps(model, "yes")


def test_a_loop_captures_on_the_second_call_checks_on_the_third_and_replays_after():
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)
    with torch.no_grad():
        assert torch.equal(steps(*inputs(0)), model(*inputs(0)))  # outside a scope: eager, nothing captured
        assert ops.captures == 0
        outs = []
        with steps.scope():
            for i in range(6):
                outs.append(steps(*inputs(i)))
                assert ops.captures == (0 if i == 0 else 1)
        assert ops.replays == 1 + 3  # the check (its replay is the answer), then one per call
        assert steps.stats.verified and steps.stats.verified[0] < 1e-6
        # every call equals the eager step on its own inputs, also the ones made before later replays (copies
        # are handed out, not the static output)
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, model(*inputs(i)), rtol=0, atol=1e-6)
        assert steps.reason.startswith("auto: captured per loop") and "1 graph(s) captured and checked, 4" in steps.reason
        # the scope released its graphs: the next loop captures again
        with steps.scope():
            for i in range(3):
                steps(*inputs(i))
        assert ops.captures == 2


def test_each_signature_has_its_own_graph():
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)
    with torch.no_grad(), steps.scope():
        for i in range(4):
            torch.testing.assert_close(steps(*inputs(i, batch=2)), model(*inputs(i, batch=2)), rtol=0, atol=1e-6)
            torch.testing.assert_close(steps(*inputs(i, batch=3)), model(*inputs(i, batch=3)), rtol=0, atol=1e-6)
    assert ops.captures == 2


def test_gradients_through_the_graphed_step_equal_eager():
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)

    def grads(fn):
        out = []
        for i in range(5):
            z, t, cond = inputs(i, grad=True)
            loss = fn(z, t, cond).pow(2).sum()
            out.append(torch.autograd.grad(loss, cond)[0])
        return out

    with steps.scope():
        graphed = grads(steps)
    assert ops.captures == 1 and steps.failed is None
    for got, want in zip(graphed, grads(model)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_auto_keeps_eager_below_the_memory_floor_and_on_overrides_it(caplog):
    model = ToyStep()
    low = FakeGraphOps()
    steps = make_steps(model, "auto", ops=low, free=cg.FREE_MEMORY_FLOOR - 1)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), torch.no_grad(), steps.scope():
        for i in range(4):
            steps(*inputs(i))
    assert low.captures == 0 and "GiB free" in caplog.text and "GiB free" in steps.reason
    forced = FakeGraphOps()
    steps = make_steps(model, "on", ops=forced, free=0)
    with torch.no_grad(), steps.scope():
        for i in range(4):
            steps(*inputs(i))
    assert forced.captures == 1


def test_a_loop_can_keep_its_steps_eager_and_probes_never_capture(caplog):
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), torch.no_grad():
        with steps.scope(enabled=False, why="UNet gradient checkpointing is on"):
            for i in range(4):
                steps(*inputs(i))
        with steps.scope(), speed.eager_only():
            for i in range(4):
                steps(*inputs(i))
    assert ops.captures == 0 and "gradient checkpointing" in caplog.text


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "with-gradients"])
@pytest.mark.parametrize("fault", ["bake", "nan", "fail"])
def test_a_wrong_or_failing_graph_turns_graphs_off_and_every_result_is_eager(fault, grad, caplog):
    model, ops = ToyStep(), FakeGraphOps(**{fault: True})
    steps = make_steps(model, ops=ops)
    outs, grads = [], []
    with caplog.at_level(logging.WARNING, logger="diff_privacy.speed"), torch.set_grad_enabled(grad), steps.scope():
        for i in range(5):
            args = inputs(i, grad=grad)
            outs.append(steps(*args))
            if grad:
                grads.append(torch.autograd.grad(outs[-1].square().sum(), args[2])[0])
    for i, out in enumerate(outs):
        args = inputs(i, grad=grad)
        with torch.set_grad_enabled(grad):
            want = model(*args)
        torch.testing.assert_close(out.detach(), want.detach(), rtol=0, atol=1e-6)
        if grad:
            torch.testing.assert_close(grads[i], torch.autograd.grad(want.square().sum(), args[2])[0], rtol=0, atol=1e-6)
    assert steps.failed and steps.reason.startswith("off after a failure")
    assert "running eagerly" in caplog.text
    if fault != "fail":
        assert "differs from the eager step" in steps.reason
    before = ops.captures
    assert not steps.enabled
    with torch.no_grad(), steps.scope():  # off for good: later loops do not try again
        for i in range(4):
            steps(*inputs(i))
    assert ops.captures == before


def test_moved_weights_drop_the_graphs_and_too_many_moves_keep_the_loop_eager(caplog):
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)

    def move():  # ComfyUI re-loaded the weights elsewhere (and, here, changed them: a stale graph would show)
        model.conv.weight.data = model.conv.weight.data.clone() * 1.5

    with torch.no_grad(), steps.scope():
        for i in range(4):
            steps(*inputs(i))
        assert ops.captures == 1
        move()
        for i in range(4):
            torch.testing.assert_close(steps(*inputs(i)), model(*inputs(i)), rtol=0, atol=1e-6)
        assert ops.captures == 2 and steps.stats.drops == 1
        with caplog.at_level(logging.INFO, logger="diff_privacy.speed"):
            for _ in range(cg.MAX_RECAPTURES - 1):
                move()
                for i in range(3):
                    torch.testing.assert_close(steps(*inputs(i)), model(*inputs(i)), rtol=0, atol=1e-6)
        assert not steps.active and f"moved {cg.MAX_RECAPTURES} times" in caplog.text
        assert steps.stats.drops == cg.MAX_RECAPTURES
        torch.testing.assert_close(steps(*inputs(1)), model(*inputs(1)), rtol=0, atol=1e-6)
    assert steps.failed is None  # only that loop: the next one captures again
    before = ops.captures
    with torch.no_grad(), steps.scope():
        for i in range(3):
            steps(*inputs(i))
    assert ops.captures == before + 1


def test_a_move_before_any_capture_costs_nothing():
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)
    with torch.no_grad(), steps.scope():
        for _ in range(cg.MAX_RECAPTURES + 1):  # ComfyUI loading the model on the first calls
            model.conv.weight.data = model.conv.weight.data.clone()
            steps(*inputs(0))
        for i in range(3):
            steps(*inputs(i))
    assert steps.stats.drops == 0 and ops.captures == 1


def test_live_weights_follow_a_tensor_replaced_in_its_slot():
    model = ToyStep()
    read = cg.live_weights(model)
    assert [w.data_ptr() for w in read()] == [w.data_ptr() for w in (*model.parameters(), *model.buffers())]
    model.conv.weight = nn.Parameter(model.conv.weight.detach().clone())  # ComfyUI's set_attr_param
    model.proj.bias = None
    assert [id(w) for w in read()] == [id(w) for w in (model.conv.weight, model.conv.bias, model.proj.weight)]


def test_a_weight_off_the_device_keeps_the_loop_eager(caplog):
    model, ops = ToyStep(), FakeGraphOps()
    offloaded = torch.empty(3, device="meta")
    steps = cg.CudaGraphSteps(model, "cpu", "auto", weights=lambda: (*model.parameters(), offloaded), ops=ops)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), torch.no_grad(), steps.scope():
        for i in range(4):
            torch.testing.assert_close(steps(*inputs(i)), model(*inputs(i)), rtol=0, atol=0)
    assert ops.captures == 0 and "low-VRAM" in caplog.text


def test_autocast_is_part_of_the_signature():
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)
    with torch.no_grad(), steps.scope():
        for i in range(4):
            steps(*inputs(i))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = steps(*inputs(i))
                torch.testing.assert_close(out, model(*inputs(i)), rtol=0, atol=0)
    assert ops.captures == 2 and steps.failed is None
    assert [cg.tolerance_for(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == [1e-3, 2e-2, 2e-2]


class Cancelled(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


def test_cancel_and_eager_errors_propagate_and_do_not_count_as_graph_failures():
    model = ToyStep()
    steps = make_steps(model, ops=FakeGraphOps(raises=Cancelled()), passthrough=(Cancelled,))
    with torch.no_grad(), steps.scope():
        steps(*inputs(0))
        with pytest.raises(Cancelled):  # Cancel inside the capture: the caller's, untouched
            steps(*inputs(1))
    assert steps.failed is None

    calls = []

    def flaky(z, t, cond):
        calls.append(1)
        if len(calls) == 1:
            raise Cancelled()  # e.g. ComfyUI's per-op interrupt check inside the eager step
        return model(z, t, cond)

    ops = FakeGraphOps()
    steps = cg.CudaGraphSteps(flaky, "cpu", "auto", weights=model.parameters, ops=ops)
    with torch.no_grad(), steps.scope():
        with pytest.raises(Cancelled):  # not swallowed (no passthrough needed: eager calls are never caught)
            steps(*inputs(0))
        for i in range(4):
            steps(*inputs(i))
    assert steps.failed is None and ops.captures == 1


def test_out_of_memory_while_capturing_keeps_only_that_loop_eager(caplog):
    model = ToyStep()
    ops = FakeGraphOps(raises=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    steps = make_steps(model, ops=ops)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), torch.no_grad(), steps.scope():
        for i in range(4):
            torch.testing.assert_close(steps(*inputs(i)), model(*inputs(i)), rtol=0, atol=0)
    assert steps.failed is None and ops.emptied == 1 and "out of memory" in caplog.text
    ops.raises = None
    with torch.no_grad(), steps.scope():  # the next loop tries again
        for i in range(4):
            steps(*inputs(i))
    assert ops.captures == 2 and steps.stats.captures == 1 and steps.stats.replays >= 1  # 1 attempt failed
    ops.replay_raises = torch.OutOfMemoryError("CUDA out of memory")  # also while checking or replaying
    with torch.no_grad(), steps.scope():
        for i in range(4):
            torch.testing.assert_close(steps(*inputs(i)), model(*inputs(i)), rtol=0, atol=0)
        assert not steps._entries and not steps.active  # the graphs were dropped before the eager answer
    assert steps.failed is None and ops.emptied == 2


def test_a_nested_disabled_block_and_a_loop_with_large_activations_stay_eager(caplog):
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops, free=10 * 2 ** 30)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), torch.no_grad():
        with steps.scope():
            with steps.scope(enabled=False, why="UNet gradient checkpointing is on"):
                for i in range(4):
                    steps(*inputs(i))
        assert ops.captures == 0 and "checkpointing" in caplog.text
        with steps.scope(resident_bytes=4 * 2 ** 30):  # 3 × 4 GiB > 10 GiB free
            for i in range(4):
                steps(*inputs(i))
        assert ops.captures == 0
        with steps.scope(resident_bytes=2 ** 30):
            for i in range(4):
                steps(*inputs(i))
        assert ops.captures == 1


def test_a_second_forward_before_the_first_backward_runs_eagerly():
    """A graph's backward uses the activations of its latest forward: two forwards in flight must not share it."""
    model, ops = ToyStep(), FakeGraphOps()
    steps = make_steps(model, ops=ops)
    with steps.scope():
        for i in range(3):  # eager, capture, check
            z, t, cond = inputs(i, grad=True)
            steps(z, t, cond).sum().backward()
        a_in, b_in = inputs(3, grad=True), inputs(4, grad=True)
        replays = steps.stats.replays
        a, b = steps(*a_in), steps(*b_in)  # b while a's backward is pending: eager
        assert steps.stats.replays == replays + 1
        (ga,) = torch.autograd.grad(a.square().sum(), a_in[2])
        (gb,) = torch.autograd.grad(b.square().sum(), b_in[2])
        steps(*inputs(5, grad=True)).sum().backward()  # nothing pending any more: a replay again
        assert steps.stats.replays == replays + 2
    for got, args in ((ga, inputs(3, grad=True)), (gb, inputs(4, grad=True))):
        (want,) = torch.autograd.grad(model(*args).square().sum(), args[2])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_weight_without_plain_storage_and_a_caching_autocast_keep_the_loop_eager(caplog):
    class Quantized:  # a wrapper tensor subclass (ComfyUI's QuantizedTensor) reads address 0
        device, dtype = torch.device("cpu"), torch.float32

        def data_ptr(self):
            return 0

        def numel(self):
            return 16

    model, ops = ToyStep(), FakeGraphOps()
    steps = cg.CudaGraphSteps(model, "cpu", "auto", weights=lambda: (*model.parameters(), Quantized()), ops=ops)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), torch.no_grad(), steps.scope():
        for i in range(4):
            steps(*inputs(i))
    assert ops.captures == 0 and "quantized" in caplog.text
    steps = make_steps(model, ops=ops)
    with caplog.at_level(logging.INFO, logger="diff_privacy.speed"), steps.scope():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # cache_enabled=True by default
            for i in range(4):
                steps(*inputs(i, grad=True))
    assert ops.captures == 0 and "weight cache" in caplog.text and steps.failed is None


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "with-gradients"])
def test_the_check_uses_the_tolerance_of_the_compute_dtype(grad):
    """A replay 0.5 % off: within fp16/bf16 rounding (2e-2), not within float32's (1e-3)."""
    model = ToyStep()
    for dtype, passes in ((None, False), (torch.float16, True)):
        steps = make_steps(model, ops=FakeGraphOps(skew=5e-3), compute_dtype=dtype)
        with torch.set_grad_enabled(grad), steps.scope():
            for i in range(4):
                steps(*inputs(i, grad=grad))
        assert (steps.failed is None) is passes, (dtype, steps.reason)
        assert steps.stats.verified[0] == pytest.approx(5e-3, rel=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graph captures need a CUDA device")
def test_real_cuda_graphs_replay_the_eager_step_with_and_without_gradients():
    model = ToyStep().cuda()
    steps = cg.CudaGraphSteps(model, "cuda", "on", weights=lambda: (*model.parameters(), *model.buffers()))
    with steps.scope():
        for i in range(6):
            z, t, cond = (x.cuda() for x in inputs(i))
            with torch.no_grad():
                torch.testing.assert_close(steps(z, t, cond), model(z, t, cond), rtol=1e-4, atol=1e-5)
            leaf = cond.detach().requires_grad_(True)
            (got,) = torch.autograd.grad(steps(z, t, leaf).square().sum(), leaf)
            (want,) = torch.autograd.grad(model(z, t, leaf).square().sum(), leaf)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert steps.failed is None and steps.stats.captures == 2 and steps.stats.replays >= 6


# ------------------------------------------------------------------------------------------ in the loops
@pytest.fixture(scope="module")
def sd_backend(tmp_path_factory):
    from core.diffusers_backend import DiffusersBackend
    tok = td.require_sd1_tokenizer_dir()
    path = td.tiny_checkpoint(str(tmp_path_factory.getbasetemp()), 0, vae="kl", text_layers=2)
    return DiffusersBackend.from_single_file(path, tokenizer_dir=tok)


def with_fake_graphs(backend, ops):
    """The backend's step with the CPU stand-in captures (what CudaGraphOps does on a GPU)."""
    unet = backend.unet
    backend._graphs = cg.CudaGraphSteps(backend._unet_eps, "cpu", "on", ops=ops,
                                        weights=lambda: (*unet.parameters(), *unet.buffers()))


def test_msi_inversion_sampling_and_recovery_through_graphs_equal_the_eager_loops(sd_backend):
    """Every loop of a protection run, each with graphs (stand-in captures) and without, same seeds."""
    assert sd_backend.cuda_graphs_status.startswith("off: CUDA graphs need a CUDA device")
    image = toy_face_image(0, size=64)
    opts = MSIOptions.preset("lite", steps=5, timesteps_per_step=2, seed=3)
    samp = SamplingOptions(steps=10, strength=0.6, batch_size=2, seed=4)
    schedule = EmbeddingSchedule.preset("anonymize")

    def run():
        msi = train_msi(sd_backend, image, opts)
        z_T = ddim_invert(sd_backend, msi.source_latent, msi.stage_conds, 10)
        z = protect(sd_backend, msi.source_latent, msi.stage_conds, sd_backend.null_conditioning(), None,
                    schedule=schedule, options=samp)
        back = recover_latent(sd_backend, z_T, msi.stage_conds, 10)
        return msi, z_T, z, back

    original = sd_backend._graphs
    try:
        eager = run()
        ops = FakeGraphOps()
        with_fake_graphs(sd_backend, ops)
        graphed = run()
        stats = sd_backend._graphs.stats
    finally:
        sd_backend._graphs = original
    assert ops.captures == 4 and stats.replays > 15 and sd_backend._graphs.failed is None
    assert max(stats.verified) < 1e-5
    torch.testing.assert_close(graphed[0].stage_conds, eager[0].stage_conds, rtol=0, atol=1e-5)
    assert graphed[0].losses == pytest.approx(eager[0].losses, rel=1e-5)
    for got, want in zip(graphed[1:], eager[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
