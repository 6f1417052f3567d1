"""The fused inference model and the fast training path compute what the plain model computes."""
import copy
import importlib
import pickle

import pytest
import torch

import metaformer
from metaformer.fast import fuse, fusion_report
from metaformer.fast.fuse import FusedPoolBlock, set_backend
from metaformer.models.metaformer import MetaFormerBlock
from metaformer.tools import bench

fuse_mod = importlib.import_module("metaformer.fast.fuse")  # the module (metaformer.fast.fuse is the function)
from metaformer.fast.training import enable_fast_training, fast_training_report

VARIANTS = ["poolformer_s12", "poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48"]


def _model(name="poolformer_s12", **kw):
    torch.manual_seed(0)
    m = metaformer.create_model(name, **kw).eval()
    bench.randomize_affine(m)  # non-trivial affines and layer scales exercise every folded term
    return m


def _max_diff(model, x, backend="auto", kept=0):
    """Max logit difference of the fused model, after checking that every block fusion covers was fused
    (``kept``: how many blocks this model must keep as they are)."""
    fused = fuse(model, backend=backend)
    report = fusion_report(fused)
    blocks = sum(isinstance(m, MetaFormerBlock) for m in model.modules())
    assert len(report.fused) == blocks - kept and len(report.kept) == kept, report
    with torch.no_grad():
        return (model(x) - fused(x)).abs().max().item()


@pytest.fixture(params=["this cpu", "no bf16 packing"])
def cpu_answer(request):
    """Run a test under this CPU's answer and under "oneDNN cannot pack bf16" (an AVX2-only CPU's),
    which exercises the fallback on any machine."""
    if request.param == "this cpu":
        yield fuse_mod.cpu_capabilities()
    else:
        with fuse_mod.assume_cpu_capabilities(bf16_packing=False) as caps:
            yield caps


def test_fused_s12_224_exact():
    x = torch.randn(1, 3, 224, 224)
    assert _max_diff(_model(), x) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_variants_224_exact(name):
    x = torch.randn(1, 3, 224, 224)
    assert _max_diff(_model(name), x) <= 1e-4


@pytest.mark.parametrize("backend", ["mkldnn", "aten"])
@pytest.mark.parametrize("size", [(64, 64), (32, 32), (65, 97)])
def test_fused_any_size_and_backend(backend, size):
    x = torch.randn(2, 3, *size)
    assert _max_diff(_model(), x, backend) <= 1e-4


@pytest.mark.parametrize("name,kw,kept", [
    ("metaformer_ppaa_s12", {}, 8),  # channel LayerNorm pooling stages + attention stages left as they are
    ("metaformer_pppf_s12", {"img_size": 64}, 2),  # spatial-MLP stage left as it is
    ("poolformer_s12", {"pool_subtract": False}, 0),
    ("poolformer_s12", {"pool_subtract": False, "mixer_residual": False}, 12),  # pool(norm(x)): kept, still exact
    ("poolformer_s12", {"pool_size": 5}, 0),
    ("poolformer_s12", {"act": "relu"}, 0),
    ("poolformer_s12", {"norm": "bn"}, 12),  # not fusable: blocks kept, still correct
    ("poolformer_s12", {"layer_scale": False}, 0),
])
def test_fused_hybrids_and_ablations(name, kw, kept):
    x = torch.randn(2, 3, 64, 64)
    assert _max_diff(_model(name, **kw), x, kept=kept) <= 1e-4


def test_fusion_report_and_strict():
    f = fuse(_model("metaformer_ppaa_s12"))
    report = fusion_report(f)
    assert len(report.fused) == 4 and len(report.kept) == 8
    assert all(name.startswith(("stages.2.", "stages.3.")) for name in report.kept)
    assert "Attention" in next(iter(report.kept.values())) and "4/12 blocks fused" in report.summary()
    with pytest.raises(metaformer.fast.FusionError, match=r"8 block\(s\) cannot be fused: stages\.2\.blocks\.0: its "
                                                          "token mixer is Attention"):
        fuse(_model("metaformer_ppaa_s12"), strict=True)
    assert fusion_report(fuse(_model(), strict=True)).kept == {}


def test_grad_checkpointing_recomputes_each_block():
    """With checkpointing, backward runs every block's forward again; without, never."""
    for on, calls_per_block in ((False, 1), (True, 2)):
        m = _model(num_classes=10, depths=(1, 1, 2, 1)).train()
        m.set_grad_checkpointing(on)
        calls = []
        for blk in m.modules():
            if isinstance(blk, MetaFormerBlock):  # count calls of forward itself (the recompute runs no hooks)
                blk.forward = lambda x, _f=blk.forward: calls.append(1) or _f(x)
        m(torch.randn(2, 3, 64, 64)).sum().backward()
        assert len(calls) == 5 * calls_per_block, (on, len(calls))


def test_fused_features_only():
    m = _model(features_only=True)
    x = torch.randn(2, 3, 64, 64)
    f = fuse(m)
    with torch.no_grad():
        for a, b in zip(m(x), f(x)):
            assert (a - b).abs().max() <= 1e-4


def test_fused_bf16_close(cpu_answer):
    m = _model()
    x = torch.randn(2, 3, 64, 64)
    f = fuse(m).to(torch.bfloat16)
    report = fusion_report(f)
    assert ("oneDNN packed" in report.convs) == cpu_answer.bf16_packing, report.convs
    with torch.no_grad():
        ref = m(x)
        out = f(x.bfloat16()).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_fuse_a_bf16_model(cpu_answer):
    m = _model()
    x = torch.randn(2, 3, 64, 64)
    f = fuse(copy.deepcopy(m).to(torch.bfloat16))
    assert len(fusion_report(f).fused) == 12
    if not cpu_answer.bf16_packing:
        assert "cannot pack bfloat16" in fusion_report(f).convs
    with torch.no_grad():
        ref = m(x)
        out = f(x.bfloat16()).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_capabilities_come_from_torch_and_can_be_assumed():
    caps = fuse_mod.detect_cpu_capabilities()
    assert caps.isa == torch.backends.cpu.get_cpu_capability()
    assert caps.bf16_packing == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with fuse_mod.assume_cpu_capabilities(bf16_packing=False):
        assert fuse_mod.packed_dtypes() == (torch.float32,)
    assert fuse_mod.cpu_capabilities() == caps


def test_fused_is_eval_only_and_picklable():
    f = fuse(_model())
    with pytest.raises(RuntimeError):
        f.train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = f(x)
        g = pickle.loads(pickle.dumps(f))
        assert torch.equal(g(x), y)
        assert torch.equal(copy.deepcopy(f)(x), y)
    assert metaformer.fuse is fuse


def test_training_gradients_match():
    m = _model(num_classes=10, drop_path_rate=0.2).train()
    f = enable_fast_training(copy.deepcopy(m))
    on, off = fast_training_report(f)
    assert len(on) == 12 and not off  # every block on the fast path
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    m(x).square().sum().backward()
    torch.manual_seed(1)
    f(x).square().sum().backward()
    for (name, p), q in zip(m.named_parameters(), f.parameters()):
        scale = p.grad.abs().max().item()
        if name.endswith("norm1.bias"):  # cancels exactly: plain autograd gives rounding noise, we give 0
            assert scale < 1e-6 and q.grad.abs().max() == 0
            continue
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name
        assert q.grad.stride() == q.stride(), name  # DDP's gradient buckets expect the parameter's layout
    assert m.state_dict().keys() == f.state_dict().keys()


def test_training_20_steps_losses_match():
    torch.manual_seed(0)
    m = metaformer.create_model("poolformer_s12", num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 40, 64),
                                drop_path_rate=0.1).train()
    f = enable_fast_training(copy.deepcopy(m))
    opts = [torch.optim.AdamW(net.parameters(), lr=1e-3) for net in (m, f)]
    data = torch.Generator().manual_seed(0)
    for step in range(20):
        x = torch.randn(2, 3, 64, 64, generator=data)
        y = torch.randint(0, 10, (2,), generator=data)
        losses = []
        for net, opt in zip((m, f), opts):
            torch.manual_seed(100 + step)  # same stochastic-depth draws for both
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1.0, abs(losses[0])), (step, losses)


def test_training_under_bf16_autocast_matches_plain_autocast():
    """Under autocast the fast path runs its convs in bf16 and the rest in fp32, as autocast runs
    the plain model: the same loss, gradients as close to fp32's as the plain model's, in fp32."""
    # no stochastic depth: the three runs below must see the same network
    m = _model(num_classes=10, depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), drop_path_rate=0.0).train()
    f = enable_fast_training(copy.deepcopy(m))
    block, fast_block = m.stages[2].blocks[0], f.stages[2].blocks[0]
    h = torch.randn(2, 64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_ac, fast_ac = block(h), fast_block(h)
    # The block's convs ran in bf16 like autocast's (a block left in fp32 would sit at fp32's
    # distance from plain autocast instead of matching it).
    assert (fast_ac - plain_ac).abs().max() <= 0.05 * (plain_ac - block(h)).abs().max()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 7])
    losses, grads = [], []
    for net, dtype in ((m, None), (m, torch.bfloat16), (f, torch.bfloat16)):
        net.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net(x)
            loss = torch.nn.functional.cross_entropy(out, y)
        assert out.dtype == (dtype or torch.float32)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in net.parameters())
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for n, p in net.named_parameters() if not n.endswith("norm1.bias")]))
    assert losses[1] == pytest.approx(losses[2], rel=2e-3)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, 0).item()  # noqa: E731
    print("cos to fp32: plain autocast", cos(grads[0], grads[1]), "fast autocast", cos(grads[0], grads[2]))
    assert cos(grads[0], grads[2]) >= cos(grads[0], grads[1]) - 0.005


def test_keep_freed_memory_keeps_large_blocks(tmp_path):
    """A freed 256 MB tensor stays in the process (reused by the next one) instead of being unmapped."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from metaformer.fast.alloc import keep_freed_memory, malloc_mode\n"
        "applied = keep_freed_memory() if sys.argv[1] == 'keep' else False\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2 ** 20\n"
        "base = rss(); t = torch.ones(64 * 2 ** 20); del t\n"
        "print(applied, round(rss() - base), malloc_mode())\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MALLOC_")}
    out = {}
    for mode in ("keep", "default"):
        r = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, env=env, check=True)
        out[mode] = r.stdout.split(maxsplit=2)
    assert out["keep"][0] == "True" and int(out["keep"][1]) >= 200 and "keep_freed_memory" in out["keep"][2]
    assert out["default"][0] == "False" and int(out["default"][1]) < 50 and "glibc default" in out["default"][2]
    r = subprocess.run([sys.executable, "-c", probe, "keep"], capture_output=True, text=True, check=True,
                       env={**env, "METAFORMER_MALLOC": "default"})
    assert r.stdout.startswith("False")


def test_harness_smoke(tmp_path):
    res = bench.bench_inference("poolformer_s12", ["eager", "fused", "gemm_ceiling"], batch=2, img_size=64,
                                repeats=2, warmup=1, log=lambda s: None)
    by = {r.mode: r for r in res}
    assert by["fused"].max_abs_diff <= 1e-4 and by["fused"].images_per_s > 0
    assert by["gemm_ceiling"].extra["gemm_gflops"] > 0
    tr = bench.bench_training("poolformer_s12", ["eager", "fast"], batch=2, img_size=64, repeats=2, warmup=1,
                              memory=False, depths=(1, 1, 1, 1))
    assert all(r.images_per_s > 0 for r in tr)
    # mixed precision as a GPU trains (autocast; fp16 with a GradScaler), here on the CPU
    half = bench.bench_training("poolformer_s12", ["eager_cl", "fast"], batch=2, img_size=64, repeats=1, warmup=1,
                                memory=False, dtype="fp16", depths=(1, 1, 1, 1))
    assert all(r.images_per_s > 0 and r.dtype == "fp16" and not r.note for r in half)
    table = bench.markdown_table(res + tr)
    assert "fused" in table and "| train |" in table
    bench.save_json(res, str(tmp_path / "r.json"))


def test_median_time_times_each_call_after_the_warm_up():
    """bench.median_time, the timer a script measuring one kernel or copy calls: the warm-up calls are left out and
    the median of the samples the device's timer reads is returned (not their mean)."""
    clock = [0.0]

    class Event:  # stands in for torch.cuda.Event: the fake clock read at record()
        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    durations = iter([1.0, 1.0, 1.0, 1.0, 0.01, 0.09, 0.02, 0.04, 0.03])  # 3 warm-up calls, 1 untimed, 5 samples

    def work():
        clock[0] += next(durations)

    timer = bench.EventTimer(torch.device("cpu"), event=Event)
    assert bench.median_time(work, "cpu", repeats=5, warmup=3, timer=timer) == pytest.approx(0.03)
    assert bench.median_time(lambda: None, "cpu", repeats=3, warmup=0) >= 0  # the host clock on the CPU


def test_cli_registers_bench():
    from metaformer.cli import build_parser

    args = build_parser().parse_args(["bench", "--batch-size", "1,8", "--dtype", "fp32,bf16"])
    assert args.batch_size == [1, 8] and args.dtype == ["fp32", "bf16"]
    assert "timm_compile" in args.modes and "timm_compile" in args.train_modes  # the strongest peer by default


# ----- the MetaFormer Baselines: PoolFormerV2 and IdentityFormer fuse too -----

@pytest.mark.parametrize("name,kw", [
    ("poolformerv2_s12", {}),
    ("poolformerv2_s12", {"pool_subtract": False}),
    ("identityformer_s12", {}),  # the mixer branch adds norm1(x): nothing cancels
    ("poolformer_s12", {"token_mixers": "identity"}),  # the v1 "identity" ablation (norm with bias, LayerScale)
])
def test_fused_baselines_blocks_exact(name, kw):
    """Bias-free GroupNorm(1), ResScale on the skip path (stages 3-4) and StarReLU folded into fc2."""
    m = _model(name, depths=(1, 1, 2, 1), **kw)  # randomize_affine also moves res scales and StarReLU's scale/bias off 1 and 0
    if not name.startswith("poolformer_"):
        assert [hasattr(s.blocks[0].res_scale1, "scale") for s in m.stages] == [False, False, True, True]
    fused = fuse(m)
    blocks = sum(len(s.blocks) for s in m.stages)
    assert sum(isinstance(b, FusedPoolBlock) for b in fused.modules()) == blocks
    for size in ((64, 64), (65, 97)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            ref = m(x)
            for backend in ("mkldnn", "aten"):
                out = set_backend(fused, backend)(x)
                assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (size, backend)


def test_fused_poolformerv2_224():
    m = _model("poolformerv2_s12")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        assert (fuse(m)(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", ["randformer_s12", "convformer_s18", "caformer_s18"])
def test_fuse_keeps_other_mixers_and_stays_exact(name):
    m = _model(name, depths=(1, 1, 1, 1), img_size=64)
    fused = fuse(m)
    n = sum(isinstance(b, FusedPoolBlock) for b in fused.modules())
    assert n == (2 if name.startswith("randformer") else 0)  # RandFormer's identity stages 1-2 fuse
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert (fused(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bench_compares_against_timms_own_baselines_models():
    from metaformer.tools.bench import timm_reference

    for name in ("poolformerv2_s12", "caformer_s18"):
        m = _model(name)
        ref = timm_reference(m)
        assert type(ref).__module__ == "timm.models.metaformer"
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():  # same weights: equal features (the heads differ by the MLP head's eps only)
            assert (ref.forward_features(x) - m.forward_features(x)).abs().max() <= 1e-5
    assert timm_reference(_model("identityformer_s12")) is None  # timm has no IdentityFormer


def test_training_gradients_match_poolformerv2():
    """The fast path on PoolFormerV2 blocks: bias-free norms, ResScale in stages 3-4, StarReLU, no MLP biases."""
    m = _model("poolformerv2_s12", num_classes=10, depths=(1, 1, 2, 1), drop_path_rate=0.2).train()
    f = enable_fast_training(copy.deepcopy(m))
    assert sum(getattr(b, "fast_training", False) for b in f.modules()) == 5  # every block
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    m(x).square().sum().backward()
    torch.manual_seed(1)
    f(x).square().sum().backward()
    names = [n for n, _ in m.named_parameters()]
    assert any("res_scale" in n for n in names) and any("mlp.act.scale" in n for n in names)
    for (name, p), q in zip(m.named_parameters(), f.parameters()):
        scale = p.grad.abs().max().item()
        assert (p.grad - q.grad).abs().max().item() <= 1e-4 * scale + 1e-7, name
        assert q.grad.stride() == q.stride(), name


def test_portable_group_norm_matches_aten():
    """The elementwise GroupNorm(1) the fast path uses where aten's kernel refuses channels_last (CUDA)."""
    from metaformer.fast.training import group_norm, group_norm_backward

    g = torch.Generator().manual_seed(0)
    y = (torch.randn(2, 24, 7, 9, generator=g) * 3 + 2).contiguous(memory_format=torch.channels_last)
    w, b, dn = torch.randn(24, generator=g), torch.randn(24, generator=g), torch.randn(2, 24, 7, 9, generator=g)
    ref = group_norm(y, w, b, 1e-5, portable=False)
    got = group_norm(y, w, b, 1e-5, portable=True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for r, o in zip(ref, got):
        assert torch.allclose(r, o, atol=1e-5)
    assert torch.allclose(group_norm(y, w, b, 1e-5, ref[1], ref[2], portable=True)[0], ref[0], atol=1e-5)
    for r, o in zip(group_norm_backward(dn, y, ref[1], ref[2], w, True, portable=False),
                    group_norm_backward(dn, y, ref[1], ref[2], w, True, portable=True)):
        assert torch.allclose(r, o, atol=1e-4)
    assert group_norm_backward(dn, y, ref[1], ref[2], w, False, portable=True)[2] is None


def test_harness_with_every_mode_skipped():
    """A configuration whose modes all skip (here: an unknown timm variant) reports each reason, not a crash."""
    res = bench.bench_inference("identityformer_s12", ["timm_eager"], batch=1, img_size=64, repeats=1, warmup=0,
                                log=lambda s: None, depths=(1, 1, 1, 1))
    assert len(res) == 1 and res[0].note.startswith("skipped:") and res[0].images_per_s != res[0].images_per_s
