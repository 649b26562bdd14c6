"""Train-step throughput of a config on this machine, as one JSON line.

    python bench/train_throughput.py [--config configs/demo.py] [--steps 10] [--host_devices N]
    python bench/train_throughput.py --peer            # peer-size UNet, ours vs diffusers' Flax
    python bench/train_throughput.py --config C --peer  # C's UNet, ours vs diffusers' Flax

The step is the training step, built by `train.setup.build_run` exactly as `python -m train`
builds it (mesh, FSDP rules, sharded state, donation). Reported: `step_s`, `images_per_s`,
`gflops_per_step` (XLA's count for the whole step, all devices), `peak_fraction` (achieved
FLOP/s over the float32 matmul peak of the same devices, measured in the same command, so a
busy shared machine weighs on both), `model_gflops_per_step` (the matrix work counted from
the step's jaxpr by `train.mfu.jaxpr_matmul_flops`: matmuls, convolutions, fused attention,
the same on every backend), `mfu` (that over the device's bf16 table peak, accelerators
only) and `peak_memory_mb` (per device: the allocator's peak where the backend reports one,
else the compiled step's own figure).

On CPU the host is split into one single-threaded XLA device per core and the process
restarts itself with glibc's huge-page tunable, as the CLIs do by default (`--host_devices 0`
leaves XLA's defaults; `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` in the environment keeps 4 KiB
pages); the peer runs with the same settings. `page_faults_per_step` counts the minor page
faults of a step (pages the kernel maps in and zeroes).

`--peer` runs the same step for diffusers 0.35.2's `FlaxUNet2DConditionModel` (the last
diffusers with Flax) at the identical UNet architecture, batch and resolution, in a subprocess
from its own environment: created once under `--peer_cache` (a venv holding only
`diffusers==0.35.2`, installed with --no-deps from the package index, that reads jax / flax /
optax from this environment so both sides run the same JAX), or the interpreter named by
`--peer_python`. The peer subprocess compiles once and then runs its timing rounds in turn
with ours (`--rounds`, `--steps` each), so a shared machine's changing load falls on both
sides alike; every figure is the median over rounds. `peer_ratio` = our images/s over the
peer's (`peer_ratio_per_round` shows the spread).
"""

import argparse
import ast
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PEER_DIFFUSERS = "diffusers==0.35.2"
# The peer-size UNet (6.7M parameters): channels 64/128/128, cross-attention on the two lower
# resolution levels (16x16, 8x8) and the mid block, 32x32, batch 32, 16 context tokens of
# width 128.
PEER_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (64, 128, 128), "layers_per_block": 1, "attention_head_dim": 8,
    "cross_attention_dim": 128, "norm_num_groups": 32, "transformer_layers_per_block": 1,
    "class_embed_type": None, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "coordinate_channels": False, "patch_size": 1,
}
PEER_BATCH, PEER_TOKENS = 32, 16
# Our UNet options diffusers' Flax UNet lacks, with the value that matches it.
_NOT_IN_PEER = {"class_embed_type": None, "resnet_time_scale_shift": "default",
                "coordinate_channels": False, "patch_size": 1}


def load_config(path):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_override(config, override: str) -> None:
    field, sep, raw = override.partition("=")
    if not sep:
        raise SystemExit(f"--set {override!r}: expected FIELD=VALUE")
    *parents, name = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    if name not in node:
        raise SystemExit(f"--set {override!r}: config has no field {field!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node[name] = value


def peer_size_config(config):
    """`config` with the peer-size UNet, 32x32 images, batch 32, a 16-token text encoder of
    width 128 (the peer gets a fixed random context of that shape instead of an encoder)."""
    config.data.image_size = 32
    config.model.unet.update(PEER_UNET)
    text = config.model.text_encoder
    text.kind, text.tokenizer, text.max_length = "demo", "bytes", PEER_TOKENS
    text.hidden_size, text.intermediate_size = 128, 256
    text.num_hidden_layers, text.num_attention_heads = 1, 4
    config.train.global_batch_size = PEER_BATCH
    return config


def peer_unet_kwargs(unet) -> dict:
    """diffusers Flax constructor arguments for the same architecture; SystemExit naming the
    option when the config uses one the peer does not have."""
    for field, off in _NOT_IN_PEER.items():
        if unet.get(field, off) != off:
            raise SystemExit(f"--peer: model.unet.{field}={unet[field]!r} has no counterpart in "
                             f"diffusers' Flax UNet (needs {off!r})")
    if unet.get("norm_num_groups", 32) != 32:
        raise SystemExit("--peer: diffusers' Flax UNet uses 32 norm groups; set "
                         "model.unet.norm_num_groups=32")
    return {
        "sample_size": unet.sample_size, "in_channels": unet.in_channels,
        "out_channels": unet.out_channels, "down_block_types": list(unet.down_block_types),
        "up_block_types": list(unet.up_block_types),
        "block_out_channels": list(unet.block_out_channels),
        "layers_per_block": unet.layers_per_block, "attention_head_dim": unet.attention_head_dim,
        "cross_attention_dim": unet.cross_attention_dim,
        "transformer_layers_per_block": unet.get("transformer_layers_per_block", 1),
    }


def peer_python(cache_dir: str) -> str:
    """The peer environment's interpreter, created on first use: a venv with diffusers 0.35.2
    only; a .pth file puts this environment's site-packages (jax, flax, optax, numpy, ...)
    after its own, so its diffusers shadows ours and everything else is shared."""
    import site

    venv = os.path.join(cache_dir, "diffusers-0.35.2-flax")
    python = os.path.join(venv, "bin", "python")
    ready = os.path.join(venv, ".ready")
    if os.path.exists(ready):
        return python
    print(f"creating the peer environment in {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    peer_site = subprocess.run(
        [python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
        capture_output=True, text=True).stdout.strip()
    with open(os.path.join(peer_site, "project_env.pth"), "w") as pth:
        pth.write("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", PEER_DIFFUSERS],
                   check=True)
    open(ready, "w").close()
    return python


class PeerProcess:
    """The peer's training step in its own interpreter, compiled once and timed on request,
    so that its timing rounds interleave with ours (bench/peer_flax_unet.py's protocol)."""

    def __init__(self, python: str, spec: dict):
        # stderr goes to a file: JAX's warnings must not fill a pipe nobody reads.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(
            [python, os.path.join(ROOT, "bench", "peer_flax_unet.py"), json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env=os.environ.copy())
        self.info = None

    def _reply(self) -> dict:
        for line in self._process.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # something the libraries printed
            if isinstance(reply, dict):
                return reply
        self._process.wait()
        self._stderr.seek(0)
        raise SystemExit(f"the peer run failed (exit {self._process.returncode}):\n"
                         f"{self._stderr.read()[-3000:]}")

    def ready(self) -> dict:
        if self.info is None:
            self.info = self._reply()
        return self.info

    def time_steps(self, steps: int) -> dict:
        """{"step_s": wall seconds, "core_s": process CPU seconds} per step."""
        self.ready()
        self._process.stdin.write(f"{steps}\n")
        self._process.stdin.flush()
        return self._reply()

    def close(self):
        if self._process.poll() is None:
            self._process.stdin.close()
            self._process.wait(timeout=60)
        self._stderr.close()


def peer_spec(unet_kwargs: dict, optim, *, batch_size: int, image_size: int,
              context_tokens: int, dtype: str = "float32",
              memory_efficient_attention: bool = False) -> dict:
    return {"unet": unet_kwargs, "batch_size": batch_size, "image_size": image_size,
            "context_tokens": context_tokens,
            # Our compute dtype (model.dtype); parameters and optimizer state stay float32 on
            # both sides.
            "dtype": dtype,
            "memory_efficient_attention": memory_efficient_attention,
            # Our optimizer's settings (clip + AdamW + EMA); the schedule costs nothing.
            "optim": {"learning_rate": float(optim.learning_rate), "b1": float(optim.b1),
                      "b2": float(optim.b2), "weight_decay": float(optim.weight_decay),
                      "grad_clip_norm": float(optim.grad_clip_norm),
                      "ema_decay": float(optim.ema_decay)}}


def minor_page_faults() -> int:
    """This process's minor page faults so far (pages the kernel mapped in fresh)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median(values):
    return statistics.median(values)


def split_cpu_before_backend_starts(host_devices: int, batch_size: int) -> None:
    """train.host_devices.apply_cpu_devices_flag, also when loading the config imported jax.

    XLA reads XLA_FLAGS when the first backend starts, not when jax is imported; configs that
    import model modules (configs/demo.py imports models.lora) import jax, which
    split_host_cpu refuses. Nothing has started a backend yet then, so the flags still apply.
    """
    from train.host_devices import accelerator_present, apply_cpu_devices_flag

    if accelerator_present():  # the split is for CPU hosts only
        return
    jax_module = sys.modules.get("jax")
    if jax_module is not None:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise SystemExit("a JAX backend started before the CPU split could be set")
        del sys.modules["jax"]
    try:
        apply_cpu_devices_flag(host_devices, batch_size)
    finally:
        if jax_module is not None:
            sys.modules["jax"] = jax_module


def main():
    from train.host_devices import restart_with_huge_pages

    restart_with_huge_pages()  # as the CLIs do, before anything starts threads
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None,
                        help="config file (default: configs/demo.py; with --peer alone, the "
                             "peer-size UNet)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds; with --peer ours and the peer's alternate, and "
                             "every figure is the median over rounds")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--host_devices", type=int, default=-1,
                        help="CPU only: split the host into this many single-threaded XLA "
                             "devices (-1: one per core, as the CLIs; 0: XLA's defaults); the "
                             "peer runs with the same split")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set model.unet.patch_size=1 "
                             "(a Python literal, else a string); repeatable")
    parser.add_argument("--peer", action="store_true",
                        help="also time diffusers 0.35.2's Flax UNet at the same architecture")
    parser.add_argument("--peer_python", default=None,
                        help="an interpreter with diffusers 0.35.2 (default: create a venv "
                             "under --peer_cache)")
    parser.add_argument("--peer_memory_efficient_attention", action="store_true",
                        help="the peer's use_memory_efficient_attention (chunked attention, "
                             "for inputs whose attention logits do not fit in memory)")
    parser.add_argument("--peer_cache", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "t2i_bench"))
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be at least 1")

    peer_size = args.peer and args.config is None
    config = load_config(args.config or os.path.join(ROOT, "configs", "demo.py"))
    if peer_size:
        peer_size_config(config)
    for override in args.set:
        apply_override(config, override)
    batch_size = args.batch_size or config.train.global_batch_size

    # Before any JAX backend starts: as the CLIs' --cpu_devices. The peer inherits it (and
    # GLIBC_TUNABLES).
    split_cpu_before_backend_starts(args.host_devices, batch_size)

    peer = None
    if args.peer:
        peer_kwargs = peer_unet_kwargs(config.model.unet)
        python = args.peer_python or peer_python(args.peer_cache)
        # Started first: it compiles while ours does.
        peer = PeerProcess(python, peer_spec(
            peer_kwargs, config.optim, batch_size=batch_size, image_size=config.data.image_size,
            context_tokens=config.model.text_encoder.max_length, dtype=config.model.dtype,
            memory_efficient_attention=args.peer_memory_efficient_attention))
    try:
        result = run_bench(args, config, batch_size, peer_size, peer)
        result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
    finally:
        if peer is not None:
            peer.close()
    print(json.dumps(result))


def run_bench(args, config, batch_size: int, peer_size: bool, peer) -> dict:
    import jax
    import numpy as np

    from train.config_check import validate_config
    from train.mfu import measured_matmul_peak, peak_flops_per_device
    from train.setup import build_run
    from train.sharding import make_mesh

    if not peer_size:
        # (The peer-size config's byte tokenizer truncates synthetic captions, which the
        # check refuses and a timing run does not care about.)
        validate_config(config)

    workdir = None
    text = config.model.text_encoder
    if text.kind == "demo" and text.get("tokenizer", "bytes") == "bpe":
        # The demo's BPE tokenizer is trained on the data's captions when training starts.
        from data_pipeline.input_pipeline import synthetic_tokenizer_workdir

        workdir = synthetic_tokenizer_workdir(config)
    mesh = make_mesh(config.mesh.shape)
    run = build_run(config, mesh, workdir=workdir, global_batch_size=batch_size)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch = jax.device_put({
        "images": rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
        "input_ids": np.asarray(run.tokenizer(["a red circle in the top left"] * batch_size)),
    }, run.data_sharding)
    state = run.state
    # A pretrained pipeline's frozen VAE, and with LoRA the frozen base UNet, as the loop passes.
    extra = run.extra_inputs
    for _ in range(2):
        state, metrics = run.compiled_step(state, run.text_params, batch, *extra)
    jax.block_until_ready(metrics)
    if peer is not None:
        # The peer warmed up right after compiling, possibly minutes ago while ours compiled:
        # one more untimed step so that neither side's first round starts cold.
        peer.ready()
        peer.time_steps(1)

    devices = jax.local_devices()
    # Each round times ours, the peer's and the matmul peak back to back, so that load from
    # other processes on a shared machine weighs on all three; figures are medians over rounds.
    rounds = []
    for _ in range(args.rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        start_faults = minor_page_faults()
        for _ in range(args.steps):
            state, metrics = run.compiled_step(state, run.text_params, batch, *extra)
        jax.block_until_ready(metrics)
        figures = {"step_s": (time.perf_counter() - start) / args.steps,
                   "core_s": (time.process_time() - start_cpu) / args.steps,
                   "faults": (minor_page_faults() - start_faults) / args.steps}
        if peer is not None:
            peer_figures = peer.time_steps(args.steps)
            figures["peer_step_s"] = peer_figures["step_s"]
            figures["peer_core_s"] = peer_figures["core_s"]
            figures["peer_faults"] = peer_figures["faults"]
        figures["matmul_peak"] = measured_matmul_peak(devices=devices) * len(devices)
        rounds.append(figures)
    if not np.isfinite(float(metrics["loss"])):
        raise SystemExit(f"our loss is not finite: {float(metrics['loss'])}")
    step_s = median([r["step_s"] for r in rounds])
    matmul_peak = median([r["matmul_peak"] for r in rounds])

    flops = run.figures.get("flops_per_step_per_device", 0.0) * mesh.size
    model_flops = run.figures.get("model_flops_per_step_per_device", 0.0) * mesh.size
    stats = devices[0].memory_stats() or {}
    peak_memory = stats.get("peak_bytes_in_use", run.figures.get("memory_bytes_per_device", 0))
    table_peak = peak_flops_per_device(devices[0])
    result = {
        "bench": "train_throughput",
        "config": "peer-size UNet" if peer_size else (args.config or "configs/demo.py"),
        "overrides": args.set,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "dtype": config.model.dtype,
        "unet_params_m": round(run.figures["unet_params"] / 1e6, 3),
        "batch_size": batch_size,
        "steps_x_rounds": [args.steps, args.rounds],
        "step_s": round(step_s, 4),
        # CPU seconds of all cores per step: the work done, which load from other processes
        # on a shared machine barely changes (on accelerators: host time only).
        "core_s_per_step": round(median([r["core_s"] for r in rounds]), 4),
        "page_faults_per_step": round(median([r["faults"] for r in rounds])),
        "images_per_s": round(batch_size / step_s, 2),
        "gflops_per_step": round(flops / 1e9, 2),
        "achieved_gflops_per_s": round(flops / step_s / 1e9, 1),
        "matmul_peak_gflops_per_s": round(matmul_peak / 1e9, 1),
        "peak_fraction": round(flops / step_s / matmul_peak, 3),
        # The step's matrix work counted from its jaxpr (matmuls, convolutions, attention),
        # the same on every backend; MFU divides it by the accelerator's table peak.
        "model_gflops_per_step": round(model_flops / 1e9, 2),
        "mfu": (round(model_flops / step_s / (table_peak * mesh.size), 3) if table_peak
                else None),
        "model_tflops_per_s_per_device": round(model_flops / step_s / mesh.size / 1e12, 3),
        "peak_memory_mb": round(peak_memory / 2**20, 1),
        "compile_s": round(run.figures["compile_seconds"], 1),
    }
    if peer is not None:
        info = peer.ready()
        peer_step_s = median([r["peer_step_s"] for r in rounds])
        result.update({
            "peer": f"diffusers {info['diffusers']} FlaxUNet2DConditionModel",
            "peer_devices": info["devices"],
            "peer_unet_params_m": info["unet_params_m"],
            "peer_step_s": round(peer_step_s, 4),
            "peer_images_per_s": round(batch_size / peer_step_s, 2),
            "peer_gflops_per_step": round(info["gflops_per_step"], 2),
            "peer_peak_fraction": round(
                info["gflops_per_step"] * 1e9 / peer_step_s / matmul_peak, 3),
            "peer_ratio": round(peer_step_s / step_s, 3),
            # Per-round ratios: their spread shows how much the machine's load moved.
            "peer_ratio_per_round": [round(r["peer_step_s"] / r["step_s"], 3) for r in rounds],
            "peer_core_s_per_step": round(median([r["peer_core_s"] for r in rounds]), 4),
            "peer_page_faults_per_step": round(median([r["peer_faults"] for r in rounds])),
            "peer_core_ratio": round(median([r["peer_core_s"] for r in rounds])
                                     / median([r["core_s"] for r in rounds]), 3),
        })
    return result


if __name__ == "__main__":
    main()
