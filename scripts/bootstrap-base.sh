#!/usr/bin/env bash
# Build offline-capable base images without Docker Hub:
#   1. debootstrap a Debian 12 rootfs and `docker import` it      -> $BASE_TAG
#   2. add Debian non-free's CUDA 11.8 toolkit (nvcc, cuobjdump)   -> $CUDA_TAG
# Both are reused when present. This is also how a user behind a firewall gets
# a CUDA devel base: pass it to envbuild with --base-image.
set -euo pipefail

DOCKER=${DOCKER:-/usr/bin/docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${DEBIAN_SUITE:-bookworm}
BASE_TAG=${BASE_TAG:-envbuild/debian:12}
CUDA_TAG=${CUDA_TAG:-envbuild/cuda:11.8-devel-debian12}

have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

if ! have_image "$BASE_TAG"; then
    command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo ">> debootstrap $SUITE into $rootfs"
    debootstrap --variant=minbase --components=main,contrib,non-free,non-free-firmware \
        "$SUITE" "$rootfs" "$MIRROR" >/dev/null
    # Keep the image small and apt quiet: no docs, no recommends.
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        > "$rootfs/etc/apt/apt.conf.d/90envbuild"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    echo ">> docker import -> $BASE_TAG"
    tar -C "$rootfs" -c . | "$DOCKER" import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"; trap - EXIT
fi

if ! have_image "$CUDA_TAG"; then
    echo ">> building $CUDA_TAG (Debian non-free nvidia-cuda-toolkit)"
    ctx=$(mktemp -d)
    cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM $BASE_TAG
# nvidia-cuda-toolkit 11.8 lives in non-free; gcc-11 because nvcc 11.8 rejects gcc > 11.
RUN apt-get update \\
 && apt-get install -y --no-install-recommends nvidia-cuda-toolkit gcc-11 g++-11 \\
      python3 python3-dev python3-venv python3-pip ca-certificates git \\
 && find /usr/lib/x86_64-linux-gnu -maxdepth 1 -name 'lib*_static*.a' ! -name libcudart_static.a -delete \\
 && rm -rf /var/lib/apt/lists/*
# Above: the CUDA libraries' static archives (2.7 GB of 7.7) go. Extensions link them through
# torch's shared libraries; nvcc's default static cudart stays.
# nvidia/cuda images keep the toolkit under /usr/local/cuda; torch's extension builder looks there.
RUN mkdir -p /usr/local/cuda/bin && ln -sf /usr/bin/nvcc /usr/local/cuda/bin/nvcc \\
 && ln -sf /usr/include /usr/local/cuda/include && ln -sf /usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 \\
 && ln -sf /usr/lib/nvidia-cuda-toolkit/bin/gcc /usr/local/bin/gcc \\
 && ln -sf /usr/lib/nvidia-cuda-toolkit/bin/g++ /usr/local/bin/g++
# nvcc calls plain gcc/g++: Debian's wrappers above pick the newest gcc nvcc accepts (gcc-11).
ENV CUDA_HOME=/usr/local/cuda CUDA_VERSION=11.8.0 CC=gcc-11 CXX=g++-11 CUDAHOSTCXX=g++-11
LABEL org.opencontainers.image.description="Debian 12 + CUDA 11.8 toolkit (Debian non-free), made by envbuild scripts/bootstrap-base.sh"
DOCKERFILE
    DOCKER_BUILDKIT=1 "$DOCKER" build -t "$CUDA_TAG" "$ctx"
    rm -rf "$ctx"
fi
echo "$CUDA_TAG"
