#!/usr/bin/env bash
# Debian packages the test suite needs: the Fashion-MNIST IDX files, promtool for metric checks,
# libb64 for Triton's perf_analyzer, docker-compose to validate compose.yaml, and chromium with its
# driver and a font for the web console's browser test.
# Installs only what is missing; needs root (or sudo).
set -euo pipefail
need=()
[ -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
ldconfig -p 2>/dev/null | grep -q libb64.so.0d || need+=(libb64-0d)  # perf_analyzer
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)  # validates compose.yaml
command -v chromium >/dev/null 2>&1 || need+=(chromium)  # tests/test_console_browser.py
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)  # legible screenshots; training/ood.py's font glyphs
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
