#!/usr/bin/env bash
# Here, after `device.sh train NAME` (or `fetch NAME`): put the files that came back from the device
# machine into runs/NAME (its reports, split and config) with the fp16 model in runs/NAME/bundle/,
# checked against the SHA-256 that `sha256sum` printed on the machine.
#   ./experiments/gpu_bundle/unpack.sh FILES_AT NAME SHA256
set -euo pipefail
cd "$(dirname "$0")/../.."
from=${1:?usage: unpack.sh FILES_AT NAME SHA256}
name=${2:?usage: unpack.sh FILES_AT NAME SHA256}
expected=${3:?usage: unpack.sh FILES_AT NAME SHA256}
mkdir -p runs
tar -xzf "$from/$name-run.tar.gz" -C runs
mkdir -p "runs/$name/bundle"
cat "$from/$name.safetensors.part-"* > "runs/$name/bundle/age_model.safetensors"
cp "$from/$name.json" "runs/$name/bundle/age_model.json"
actual=$(sha256sum "runs/$name/bundle/age_model.safetensors" | cut -d' ' -f1)
if [ "$actual" != "$expected" ]; then
    echo "runs/$name/bundle/age_model.safetensors: SHA-256 $actual, not $expected: fetch it again" >&2
    exit 1
fi
echo "runs/$name: reports, split and config; runs/$name/bundle/age_model.safetensors (SHA-256 checked)"
