#!/usr/bin/env bash
# Build the cq-prefect worker image on this machine, from no registry at all:
#
#   1. debootstrap a minimal Debian bookworm root file system (python3 is 3.11 there, git for the
#      experiments' commit tags) and `docker import` it as the base image  cq-debian:bookworm-<hash>;
#   2. `docker build` docker/Dockerfile on it: a venv with cq-prefect installed from this checkout,
#      without torch (only examples/pose needs it: `pip install "cq-prefect[pose]"`), tagged
#      cq-prefect:src-<hash of pyproject.toml + cq_prefect/ + docker/ + pinned versions>.
#
# Each image is built only when its tag is missing, so a second call takes about a second; the base
# (rarely changes) is cached apart from the cq-prefect layer. The image reference is the last line on
# stdout; progress goes to stderr.
#
#   docker/build_image.sh            # → cq-prefect:src-1a2b3c4d5e6f
#   docker/build_image.sh --force    # rebuild both images even if their tags exist
#
# Needs root (debootstrap), a running dockerd, debootstrap, and network access to a Debian mirror and
# PyPI. Environment: CQ_IMAGE_REPO (cq-prefect), CQ_BASE_REPO (cq-debian), CQ_DEBIAN_MIRROR
# (http://deb.debian.org/debian), CQ_CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt: copied into the image
# so pip trusts the same certificates as this host, a TLS-inspecting proxy's CA included),
# CQ_IMAGE_PYTHON (a Python whose prefect/mlflow/prefect-docker versions the image pins; default the
# repository's .venv when it exists, so containers talk to this host's servers with the same versions).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE_REPO="${CQ_IMAGE_REPO:-cq-prefect}"
BASE_REPO="${CQ_BASE_REPO:-cq-debian}"
SUITE=bookworm
MIRROR="${CQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CQ_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
BASE_PACKAGES="python3,python3-venv,ca-certificates,git"
FORCE=0

say() { echo "build_image: $*" >&2; }
die() { echo "build_image: error: $*" >&2; exit 1; }

for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg'; usage: docker/build_image.sh [--force]" ;;
    esac
done

docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon; start it (as root: \`dockerd >/var/log/dockerd.log 2>&1 &\`,
or \`systemctl start docker\`) and run this again"
[[ -r "$CA_BUNDLE" ]] || die "CA bundle $CA_BUNDLE is missing; install ca-certificates or set CQ_CA_BUNDLE=/path/to/bundle.pem"

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# -- 1. the base image ------------------------------------------------------------------------------
# Its tag changes only with the recipe below (suite, packages, clean-up), never with the sources.
BASE_RECIPE="$SUITE minbase $BASE_PACKAGES v1"
BASE_TAG="$BASE_REPO:$SUITE-$(printf '%s' "$BASE_RECIPE" | sha256sum | cut -c1-12)"

# One build at a time on this host (two test sessions may ask at once); the second finds the tags made.
exec 9>"${TMPDIR:-/tmp}/cq-build-image.lock"
flock 9

if [[ $FORCE == 1 ]] || ! image_exists "$BASE_TAG"; then
    [[ $(id -u) == 0 ]] || die "building the base image needs root (debootstrap); run as root or with sudo"
    command -v debootstrap >/dev/null || die "debootstrap is not installed; \`apt-get install debootstrap\`"
    ROOTFS="$(mktemp -d "${CQ_ROOTFS_PARENT:-/var/tmp}/cq-rootfs.XXXXXX")"
    trap 'rm -rf --one-file-system "$ROOTFS"' EXIT
    started=$SECONDS
    say "debootstrapping Debian $SUITE ($BASE_PACKAGES) from $MIRROR into $ROOTFS …"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >&2 \
        || die "debootstrap failed (log: $ROOTFS/debootstrap/debootstrap.log); check that $MIRROR is reachable or set CQ_DEBIAN_MIRROR"
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/log/*.log
    # Docker bind-mounts workdirs owned by other users; git must still read their commit.
    chroot "$ROOTFS" git config --system safe.directory '*'
    say "importing it as $BASE_TAG …"
    tar --numeric-owner -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
    rm -rf --one-file-system "$ROOTFS"
    trap - EXIT
    say "base image $BASE_TAG built in $((SECONDS - started)) s"
else
    say "base image $BASE_TAG exists (cached)"
fi

# -- 2. the cq-prefect image ------------------------------------------------------------------------
PYTHON="${CQ_IMAGE_PYTHON:-}"
[[ -z "$PYTHON" && -x "$REPO/.venv/bin/python" ]] && PYTHON="$REPO/.venv/bin/python"
PINS=""
if [[ -n "$PYTHON" ]]; then
    PINS="$("$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
pins = []
for name in ("prefect", "prefect-docker", "mlflow"):
    try:
        pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
print(" ".join(pins))
EOF
)"
fi

SOURCE_HASH="$(
    cd "$REPO"
    {
        find pyproject.toml docker/Dockerfile docker/build_image.sh cq_prefect -type f \
            -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum
        echo "base $BASE_TAG pins $PINS"
    } | sha256sum | cut -c1-12
)"
IMAGE_TAG="$IMAGE_REPO:src-$SOURCE_HASH"

if [[ $FORCE == 0 ]] && image_exists "$IMAGE_TAG"; then
    say "image $IMAGE_TAG exists (cached)"
    echo "$IMAGE_TAG"
    exit 0
fi

CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/cq-image-context.XXXXXX")"
trap 'rm -rf "$CONTEXT"' EXIT
# Only what the image needs: never .venv, .git or test folders.
cp "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/docker/Dockerfile" "$CONTEXT/"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - cq_prefect | tar -C "$CONTEXT" -xf -
cp "$CA_BUNDLE" "$CONTEXT/ca-certificates.crt"
printf '%s\n' $PINS >"$CONTEXT/constraints.txt"

started=$SECONDS
say "building $IMAGE_TAG on $BASE_TAG (pins: ${PINS:-none}) …"
# --network host: pip reaches PyPI the way this host does, whatever the bridge network allows.
DOCKER_BUILDKIT=0 docker build --network host --pull=false \
    --build-arg "BASE=$BASE_TAG" --label "io.cq-prefect.source-hash=$SOURCE_HASH" \
    -t "$IMAGE_TAG" -t "$IMAGE_REPO:latest-build" "$CONTEXT" >&2 \
    || die "docker build failed (output above); check that PyPI is reachable from this host"
say "image $IMAGE_TAG built in $((SECONDS - started)) s"
# Keep the newest five source tags: they share all but their last layer, but the list should not grow
# forever. A tag a container still uses is kept (no --force).
docker images "$IMAGE_REPO" --format '{{.Tag}}' | grep '^src-' | tail -n +6 \
    | while read -r old_tag; do docker rmi "$IMAGE_REPO:$old_tag" >/dev/null 2>&1 || true; done
echo "$IMAGE_TAG"
