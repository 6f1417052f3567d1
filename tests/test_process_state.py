"""``import metaformer`` (and using it: building models, the training transform, the command line called from
Python) leaves torch, timm, warnings and the process as it found them. The one change is the point of the
import: our models (``metaformer_*``) and our FX leaf module join timm's registries, next to timm's own
entries, which stay as they were.

Checked in a fresh interpreter: everything is read before the import, and again after the use."""
import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r'''
    import json, os, signal, sys, types, warnings
    import torch, timm, torchvision  # noqa: F401

    def ident(v):
        return f"{type(v).__name__}:{id(v)}"

    def container(v):
        if isinstance(v, dict):
            return {str(k): ident(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [ident(x) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted(ident(x) if not isinstance(x, str) else x for x in v)
        return None

    def timm_state(modules):
        out = {}
        for name in modules:
            mod = sys.modules[name]
            for attr, value in vars(mod).items():
                key = f"{name}.{attr}"
                out[key] = ident(value)
                c = container(value)
                if c is not None:
                    out[key + "[]"] = c
                if isinstance(value, type) and value.__module__.startswith("timm"):
                    out[key + ".__dict__"] = {k: ident(v) for k, v in vars(value).items()
                                              if k not in ("__doc__", "__slotnames__")}  # copyreg's cache
        return out

    def torch_state():
        b = torch.backends
        return dict(
            threads=torch.get_num_threads(), dtype=str(torch.get_default_dtype()), grad=torch.is_grad_enabled(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            matmul_precision=torch.get_float32_matmul_precision(), cudnn_benchmark=b.cudnn.benchmark,
            cudnn_deterministic=b.cudnn.deterministic, cudnn_tf32=b.cudnn.allow_tf32,
            cuda_tf32=b.cuda.matmul.allow_tf32, mkldnn=b.mkldnn.enabled, anomaly=torch.is_anomaly_enabled(),
            printoptions=repr(vars(torch._tensor_str.PRINT_OPTS)))

    def process_state():
        return dict(
            warning_filters=[repr(f) for f in warnings.filters], showwarning=ident(warnings.showwarning),
            formatwarning=ident(warnings.formatwarning), argv=list(sys.argv), path=list(sys.path),
            environ=dict(os.environ), sigint=ident(signal.getsignal(signal.SIGINT)),
            sigterm=ident(signal.getsignal(signal.SIGTERM)), excepthook=ident(sys.excepthook),
            stdout=ident(sys.stdout), stderr=ident(sys.stderr))

    TIMM = sorted(n for n, m in sys.modules.items() if n.startswith("timm") and isinstance(m, types.ModuleType))
    before = dict(timm=timm_state(TIMM), torch=torch_state(), process=process_state())

    import metaformer
    from metaformer import data as D
    from metaformer.cli import main
    from metaformer.tasks.train_config import TrainConfig

    metaformer.create_model("poolformer_s12", depths=[1, 1, 1, 1])
    timm.create_model("metaformer_caformer_s18", depths=[1, 1, 1, 1], features_only=True, feature_cls="fx")
    D.train_transform(TrainConfig(img_size=32), metaformer.get_model_info("poolformer_s12").preprocessing())
    assert main(["info", "poolformer_s12"]) == 0

    after = dict(timm=timm_state(TIMM), torch=torch_state(), process=process_state())
    print("\nSTATE" + json.dumps(dict(before=before, after=after)))
''')


REGISTRIES = ("timm.models._registry.", "timm.layers._fx.")  # where registering our models adds entries


def ours(key: str) -> bool:
    return key.startswith("metaformer_") or key == "timm_registry"


def test_import_and_use_leave_torch_timm_and_warnings_as_they_were():
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = json.loads(p.stdout.split("\nSTATE", 1)[1])
    before, after = state["before"], state["after"]
    assert after["torch"] == before["torch"]
    assert after["process"] == before["process"]
    changed = []
    for key, old in before["timm"].items():
        new = after["timm"].get(key)
        if new == old:
            continue
        if key.startswith(REGISTRIES) and key.endswith("[]"):
            if isinstance(old, dict) and all(new.get(k) == v for k, v in old.items()) \
                    and all(ours(k) for k in new if k not in old):
                continue  # our models added next to timm's; timm's own entries untouched
            if isinstance(old, list) and set(old) <= set(new):
                continue  # our FX leaf module added to the notrace set
        changed.append(key)
    assert not changed, f"metaformer changed timm: {changed[:10]}"
    added = [k for k in after["timm"] if k not in before["timm"]]
    assert not added, f"metaformer added attributes to timm: {added[:10]}"
