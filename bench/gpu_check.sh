#!/usr/bin/env bash
# What only a GPU can show, in one script (about 8 minutes on one H100/H200):
#   1. bf16 autocast with FlashAttention: which SDPA kernel actually runs, by name (torch profiler);
#   2. FSDP2 on NCCL: a sharded run saves, is resumed from its signed DCP checkpoint, and continues;
#   3. decode_on_device: the device part of the loader with nvjpeg (bench/loader.py --device cuda);
#   4. ViT-B/16 samples/s and MFU at masking 0 / 0.5 / 0.75, beside open_clip_train on the same GPU.
#
#   bash bench/gpu_check.sh 2>&1 | tee gpu_check.log       # from the repository root
#
# Needs the project's Python packages (`make install`, or on a machine without network the carried
# wheels on PYTHONPATH: ../shared/ENVIRONMENT.md) and no data: it writes a synthetic MDS stream.
# CI never runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
COMPOSER=${COMPOSER:-composer}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export NO_ALBUMENTATIONS_UPDATE=1

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== 1. bf16 + flash attention: the SDPA kernels that ran"
$PY - <<'EOF'
import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.algorithms.flash_attention import swap_attention
from pipeline.config import ModelConfig
from pipeline.model.clip import build_clip, encode
from pipeline.model.towers import install_patch_dropout

clip = build_clip(ModelConfig(name="ViT-B-16", context_length=32))[0].cuda().train()
swap_attention(clip)
install_patch_dropout(clip, 0.5, seed=0)
images, texts = torch.randn(64, 3, 224, 224, device="cuda"), torch.randint(1, 49406, (64, 32), device="cuda")
with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
    features = encode(clip, images, texts, torch.arange(64))
    (features.image.float().sum() + features.text.float().sum()).backward()
kernels = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ("flash", "fmha", "attention", "sdpa"))})
print("attention kernels:", *kernels, sep="\n  ")
assert any("flash" in k.lower() for k in kernels), "no flash kernel ran"
print("image features dtype under autocast:", features.image.dtype)
EOF

echo "== a synthetic MDS stream (photo-like JPEGs, 256 px)"
$PY - "$WORK/stream" <<'EOF'
import io, sys
import numpy as np
from PIL import Image
from streaming import MDSWriter

rng = np.random.default_rng(0)
with MDSWriter(out=sys.argv[1], columns={"image": "bytes", "caption": "str"}, hashes=["xxh64"]) as writer:
    for i in range(4096):
        pixels = (rng.random((256, 320, 3)) * 64 + rng.integers(0, 192, 3)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        writer.write({"image": buffer.getvalue(), "caption": f"a photo of thing number {i % 97}"})
EOF

echo "== 2. FSDP2 on NCCL: sharded save, resume, continue (ViT-B/16, bf16, 50% masking)"
cat > "$WORK/gpu.yaml" <<YAML
run_name: gpu-check
run_dir: $WORK/run
device: gpu
precision: amp_bf16
checkpoint: {save_interval: 10ba, autoresume: true}
progress_bar: false
console_log_interval: 10ba
model: {name: ViT-B-16, context_length: 32}
data: {global_batch_size: 128, num_workers: 4, streams: {synthetic: {local: $WORK/stream}}}
parallelism: {sharding: FULL_SHARD, state_dict_type: sharded}
algorithms: {patch_masking: {ratio: 0.5}, flash_attention: true}
optimizer: {name: adamw, lr: 1.0e-4}
scheduler: {warmup: 5ba}
YAML
$COMPOSER -n 1 pipeline/train.py "$WORK/gpu.yaml" max_duration=10ba
$COMPOSER -n 1 pipeline/train.py "$WORK/gpu.yaml" max_duration=20ba 2>&1 | grep -E "batch=(11|20)/20|Error" || true
ls -a "$WORK/run/checkpoints/ep0-ba20"

echo "== 3. decode_on_device: nvjpeg"
$PY bench/loader.py --source "$WORK/stream" --samples 1024 --sizes 256 --repeats 1 --device cuda

echo "== 4. ViT-B/16 samples/s and MFU beside open_clip_train (bf16, batch 256)"
$PY bench/throughput.py --peer --model ViT-B-16 --device gpu --precision amp_bf16 --batch 256 --steps 15 --warmup 5 \
    --workers 8 --source "$WORK/stream"
