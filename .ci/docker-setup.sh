#!/usr/bin/env bash
# .ci/docker-setup.sh -- bring up a local Docker engine and build the images
# the isolate test-suite needs, without any image registry.
#
#   bash .ci/docker-setup.sh
#
# Idempotent: a second run skips every step that is already done.
# Runs as root on Debian 12 (bookworm).  Only the Debian package mirror that
# the host's apt is configured with is used; it is read at run time from the
# apt sources, never written in this repository.
#
# Environment knobs:
#   ISOLATE_REBUILD_IMAGES=1     rebuild every image even if its tag exists
#                                (the cached debootstrap tarball is reused)
#   ISOLATE_REBUILD_ROOTFS=1     also redo the debootstrap (ignore the tarball)
#   ISOLATE_DEBIAN_MIRROR=URL    override the mirror found in the apt sources
#   ISOLATE_DEBIAN_SECURITY_MIRROR=URL|none   same for the -security suite
#   ISOLATE_IMAGE_CACHE=DIR      cache dir (default /var/cache/isolate-images)
#   ISOLATE_DOCKERD_LOG=FILE     dockerd log (default /var/log/isolate-dockerd.log)
#   ISOLATE_DOCKERD_EXTRA_ARGS   extra flags for dockerd (word-split)
#
# Images (see docker/README.md):
#   isolate-local/debian:bookworm   debootstrap --variant=minbase, imported
#   isolate-local/postgres:15       docker/postgres
#   isolate-local/redis:7           docker/redis
#   isolate-local/python:3          docker/python
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKER_CTX="$REPO_ROOT/docker"
CACHE_DIR="${ISOLATE_IMAGE_CACHE:-/var/cache/isolate-images}"
DOCKERD_LOG="${ISOLATE_DOCKERD_LOG:-/var/log/isolate-dockerd.log}"
BUILD_LOG_DIR="/var/log/isolate-images"
REBUILD="${ISOLATE_REBUILD_IMAGES:-0}"
REBUILD_ROOTFS="${ISOLATE_REBUILD_ROOTFS:-0}"

SUITE=bookworm
BASE_TAG="isolate-local/debian:bookworm"
ROOTFS_INCLUDE="ca-certificates"
# Bump when the way the root filesystem is made changes (invalidates caches).
ROOTFS_RECIPE=1
LABEL_KEY="io.isolate.recipe"
HOST_PACKAGES=(docker.io debootstrap debian-archive-keyring)

# The docker client may be newer than Debian's engine; use the classic
# builder, which the 20.10 engine supports without the buildx plugin.
export DOCKER_BUILDKIT=0
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

T0=$SECONDS
STEP_T0=$SECONDS
log()  { printf '[docker-setup %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die()  { printf '[docker-setup %4ds] ERROR: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 1; }
step() { STEP_T0=$SECONDS; log "$*"; }
done_step() { log "  -> ${1:-done} (${2:-$((SECONDS - STEP_T0))}s)"; }
show_tail() { # file [lines]
    if [ -f "$1" ]; then
        printf -- '----- last %s lines of %s -----\n' "${2:-40}" "$1" >&2
        tail -n "${2:-40}" "$1" >&2 || true
        printf -- '-----\n' >&2
    fi
}

[ "$(id -u)" = 0 ] || die "must run as root (uid 0), not uid $(id -u)"
[ -d "$DOCKER_CTX" ] || die "missing $DOCKER_CTX (run from a checkout of the repository)"

mkdir -p "$CACHE_DIR" "$BUILD_LOG_DIR" "$(dirname "$DOCKERD_LOG")"

# One run at a time (CI and a developer may call this concurrently).
exec 9>"$CACHE_DIR/.lock"
if ! flock -n 9; then
    log "another docker-setup run holds $CACHE_DIR/.lock; waiting (max 30 min)"
    flock -w 1800 9 || die "timed out waiting for $CACHE_DIR/.lock"
fi

# Temporary directories to remove on exit (never touches dockerd).
TMP_PATHS=()
unmount_under() { # dir: unmount everything mounted below dir (deepest first)
    local dir mnt
    dir="$(readlink -f "$1")"
    awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts \
        | sort -r | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
}
cleanup() {
    local p
    for p in "${TMP_PATHS[@]+"${TMP_PATHS[@]}"}"; do
        [ -e "$p" ] || continue
        [ -d "$p" ] && unmount_under "$p"
        rm -rf --one-file-system "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'die "interrupted"' INT TERM

# ---------------------------------------------------------------- packages
pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

apt_get() {
    apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 "$@"
}

step "host packages: ${HOST_PACKAGES[*]}"
missing=()
for p in "${HOST_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -eq 0 ]; then
    done_step "already installed"
else
    log "  installing: ${missing[*]}"
    apt_log="$BUILD_LOG_DIR/apt-install.log"
    if ! { apt_get update && apt_get install -y --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1 </dev/null; then
        show_tail "$apt_log"
        die "apt-get could not install: ${missing[*]} (log: $apt_log)"
    fi
    for p in "${missing[@]}"; do pkg_installed "$p" || die "package $p still not installed (log: $apt_log)"; done
    done_step "installed"
fi
command -v dockerd >/dev/null || die "dockerd not found after installing docker.io"
command -v docker >/dev/null || die "docker client not found after installing docker.io"
command -v debootstrap >/dev/null || die "debootstrap not found"

# ---------------------------------------------------------------- engine
docker_ok() { timeout 20 docker info >/dev/null 2>&1; }

pid_alive() { # pid [comm]: running (not a zombie), and named comm if given
    local _p comm state
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] || return 1
    # "PID (comm) STATE ...": a killed process lingers as a zombie (Z) until
    # its parent (here possibly a slow-reaping PID 1) collects it.
    read -r _p comm state _p <"/proc/$1/stat" 2>/dev/null || return 1
    [ "$state" != Z ] && [ "$state" != X ] || return 1
    [ -z "${2:-}" ] || [ "$comm" = "($2)" ]
}

dockerd_running_pid() { # prints the pid of a live dockerd from its pidfile
    local pid
    pid="$(cat /var/run/docker.pid 2>/dev/null || true)"
    pid_alive "$pid" dockerd || return 1
    echo "$pid"
}

DOCKERD_PID=""
# No default bridge and no iptables rules: user-defined networks (isolate's mapped mode)
# still work, and with no iptables a port published on 127.0.0.1 is served by the
# userland proxy (docker-proxy, in the docker.io package): asked for explicitly, by path.
userland_proxy() {
    local path
    path="$(command -v docker-proxy || true)"
    [ -x "$path" ] || die "docker-proxy not found on PATH: published ports (isolate's mapped mode) need it; reinstall docker.io"
    echo "$path"
}

start_dockerd() {
    local proxy
    proxy="$(userland_proxy)" || exit 1
    local args=(--bridge=none --iptables=false --userland-proxy=true "--userland-proxy-path=$proxy")
    # A pidfile left by a dead dockerd makes a new one refuse to start.
    rm -f /var/run/docker.pid
    # dockerd waits (then gives up) on the containerd named in this pidfile
    # while that pid exists, even as an unreaped zombie: drop a stale one.
    local cpidf=/var/run/docker/containerd/containerd.pid
    if [ -f "$cpidf" ] && ! pid_alive "$(cat "$cpidf" 2>/dev/null || true)" containerd; then
        rm -f "$cpidf"
    fi
    # --ip6tables is not in every engine version (Debian's 20.10 has it).
    if dockerd --help 2>&1 | grep -q -- '--ip6tables'; then
        args+=(--ip6tables=false)
    fi
    # shellcheck disable=SC2206  # intentional word splitting
    args+=(${ISOLATE_DOCKERD_EXTRA_ARGS:-})
    log "  starting: dockerd ${args[*]} (log: $DOCKERD_LOG)"
    printf '\n===== %s docker-setup starting dockerd %s\n' "$(date -u +%FT%TZ)" "${args[*]}" >>"$DOCKERD_LOG"
    # setsid: own session, so it outlives this script and its process group.
    # 9>&-: dockerd must not inherit (and so hold forever) our lock fd.
    setsid nohup dockerd "${args[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    DOCKERD_PID=$!
}

step "docker engine"
if docker_ok; then
    done_step "already answering"
else
    if pid="$(dockerd_running_pid)"; then
        log "  dockerd (pid $pid) is running but not answering yet; waiting for it"
        DOCKERD_PID=$pid
    else
        start_dockerd
    fi
    deadline=$((SECONDS + 60))
    until docker_ok; do
        if ! pid_alive "$DOCKERD_PID"; then
            show_tail "$DOCKERD_LOG" 60
            die "dockerd (pid $DOCKERD_PID) exited during start-up (log: $DOCKERD_LOG)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_tail "$DOCKERD_LOG" 60
            die "docker engine did not answer 'docker info' within 60s (log: $DOCKERD_LOG)"
        fi
        sleep 1
    done
    done_step "up: $(docker info --format 'server {{.ServerVersion}}, storage {{.Driver}}, cgroup v{{.CgroupVersion}}' 2>/dev/null || echo '?')"
fi

# ---------------------------------------------------------------- mirror
# Print "suite<TAB>uri<TAB>components" for every enabled 'deb' source.
apt_source_entries() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk '
            function flush(   i, j, ns, nu, s, u, t) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && tolower(enabled) != "no") {
                    ns = split(suites, s, /[ \t]+/); nu = split(uris, u, /[ \t]+/)
                    for (i = 1; i <= ns; i++) for (j = 1; j <= nu; j++)
                        if (s[i] != "" && u[j] != "") printf "%s\t%s\t%s\n", s[i], u[j], comps
                }
                types = ""; suites = ""; uris = ""; comps = ""; enabled = ""; key = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ {                       # continuation line
                v = $0; sub(/^[ \t]+/, "", v)
                if (key == "types") types = types " " v
                else if (key == "uris") uris = uris " " v
                else if (key == "suites") suites = suites " " v
                else if (key == "components") comps = comps " " v
                next
            }
            {
                key = tolower($0); sub(/:.*/, "", key)
                v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v)
                if (key == "types") types = v
                else if (key == "uris") uris = v
                else if (key == "suites") suites = v
                else if (key == "components") comps = v
                else if (key == "enabled") enabled = v
            }
            END { flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '
            { sub(/#.*/, "") }
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                uri = $i; suite = $(i + 1); comps = ""
                for (k = i + 2; k <= NF; k++) comps = comps (comps == "" ? "" : " ") $k
                if (uri != "" && suite != "") printf "%s\t%s\t%s\n", suite, uri, comps
            }
        ' "$f"
    done
}

# True when apt's downloaded lists say this URI+suite is the Debian archive.
is_debian_origin() { # uri suite
    local u="${1%/}" f
    u="${u#*://}"; u="${u//\//_}"
    for f in /var/lib/apt/lists/"${u}"_dists_"$2"_InRelease /var/lib/apt/lists/"${u}"_dists_"$2"_Release; do
        [ -f "$f" ] && grep -q '^Origin: Debian' "$f" && return 0
    done
    return 1
}

pick_mirror() { # suite -> prints the URI serving that suite with "main"
    local suite="$1" s uri comps fallback=""
    while IFS=$'\t' read -r s uri comps; do
        [ "$s" = "$suite" ] || continue
        case " $comps " in *" main "*) ;; *) continue ;; esac
        case "$uri" in http://*|https://*|ftp://*|file:/*) ;; *) continue ;; esac
        if is_debian_origin "$uri" "$suite"; then echo "${uri%/}"; return 0; fi
        [ -n "$fallback" ] || fallback="${uri%/}"
    done < <(apt_source_entries)
    [ -n "$fallback" ] || return 1
    echo "$fallback"
}

MIRROR="${ISOLATE_DEBIAN_MIRROR:-}"
if [ -z "$MIRROR" ]; then
    MIRROR="$(pick_mirror "$SUITE")" \
        || die "no apt source for suite '$SUITE' (component main) in /etc/apt/sources.list{,.d/*.sources,.d/*.list}; set ISOLATE_DEBIAN_MIRROR"
fi
SEC_MIRROR="${ISOLATE_DEBIAN_SECURITY_MIRROR:-}"
if [ -z "$SEC_MIRROR" ]; then
    SEC_MIRROR="$(pick_mirror "$SUITE-security" || true)"
elif [ "$SEC_MIRROR" = none ]; then
    SEC_MIRROR=""
fi
HAS_UPDATES=0
if apt_source_entries | awk -F'\t' -v s="$SUITE-updates" '$1 == s { f = 1 } END { exit !f }'; then
    HAS_UPDATES=1
fi
log "debian mirror: $MIRROR${SEC_MIRROR:+ (security: $SEC_MIRROR)}$([ "$HAS_UPDATES" = 1 ] && echo " (+$SUITE-updates)")"

# ---------------------------------------------------------------- helpers
hash_str() { printf '%s' "$1" | sha256sum | cut -c1-16; }
hash_dir() { # dir -> hash of every file's path and content
    (cd "$1" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) | sha256sum | cut -c1-16
}
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null; }
image_recipe() {
    docker image inspect -f "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$1" 2>/dev/null || true
}
# Should TAG be (re)built for RECIPE?  Prints the reason on stdout.
needs_build() { # tag recipe
    local have
    if [ "$REBUILD" = 1 ]; then echo "ISOLATE_REBUILD_IMAGES=1"; return 0; fi
    if ! image_id "$1" >/dev/null; then echo "not built yet"; return 0; fi
    have="$(image_recipe "$1")"
    if [ "$have" != "$2" ]; then echo "recipe changed (${have:-none} -> $2)"; return 0; fi
    return 1
}

# ---------------------------------------------------------------- base image
SOURCES_LIST="deb $MIRROR $SUITE main"
[ "$HAS_UPDATES" = 1 ] && SOURCES_LIST+=$'\n'"deb $MIRROR $SUITE-updates main"
[ -n "$SEC_MIRROR" ] && SOURCES_LIST+=$'\n'"deb $SEC_MIRROR $SUITE-security main"
ROOTFS_KEY="$(hash_str "recipe=$ROOTFS_RECIPE suite=$SUITE include=$ROOTFS_INCLUDE arch=$(dpkg --print-architecture) sources=$SOURCES_LIST")"
ROOTFS_TAR="$CACHE_DIR/debian-$SUITE-minbase-$ROOTFS_KEY.tar"

make_rootfs_tarball() {
    local tree="$CACHE_DIR/rootfs.tmp.$$" dlog="$BUILD_LOG_DIR/debootstrap.log"
    TMP_PATHS+=("$tree" "$ROOTFS_TAR.tmp.$$")
    mkdir -p "$CACHE_DIR/debs"
    log "  debootstrap --variant=minbase --include=$ROOTFS_INCLUDE $SUITE (log: $dlog)"
    if ! debootstrap --variant=minbase --include="$ROOTFS_INCLUDE" --cache-dir="$CACHE_DIR/debs" \
            "$SUITE" "$tree" "$MIRROR" >"$dlog" 2>&1 </dev/null; then
        show_tail "$dlog"
        show_tail "$tree/debootstrap/debootstrap.log"
        die "debootstrap failed (log: $dlog)"
    fi
    unmount_under "$tree"

    # apt inside the image uses the host's mirror (value read at run time).
    printf '%s\n' "$SOURCES_LIST" >"$tree/etc/apt/sources.list"
    rm -f "$tree"/etc/apt/sources.list.d/*
    # Don't let package maintainer scripts start services at build time.
    printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
    chmod 0755 "$tree/usr/sbin/policy-rc.d"
    # Small images: no recommends, no cached .debs, no translations, no docs.
    cat >"$tree/etc/apt/apt.conf.d/90isolate-image" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Acquire::Retries "3";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    cat >"$tree/etc/dpkg/dpkg.cfg.d/90isolate-image" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
EOF
    # Runtime-provided or host-specific files.
    : >"$tree/etc/resolv.conf"
    : >"$tree/etc/machine-id"
    echo localhost >"$tree/etc/hostname"
    rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin \
        "$tree"/var/cache/apt/archives/*.deb "$tree"/var/cache/apt/archives/partial/* \
        "$tree"/var/log/*.log "$tree"/var/log/apt/* "$tree"/tmp/* "$tree"/var/tmp/* \
        "$tree/debootstrap"

    tar --numeric-owner --one-file-system -C "$tree" -cf "$ROOTFS_TAR.tmp.$$" .
    mv -f "$ROOTFS_TAR.tmp.$$" "$ROOTFS_TAR"
    rm -rf --one-file-system "$tree"
    # Drop tarballs of older recipes / other mirrors.
    find "$CACHE_DIR" -maxdepth 1 -name "debian-$SUITE-minbase-*.tar" ! -path "$ROOTFS_TAR" -delete
}

step "image $BASE_TAG"
if reason="$(needs_build "$BASE_TAG" "$ROOTFS_KEY")"; then
    log "  building: $reason"
    if [ "$REBUILD_ROOTFS" = 1 ] || [ ! -s "$ROOTFS_TAR" ]; then
        make_rootfs_tarball
    else
        log "  reusing cached root filesystem $ROOTFS_TAR"
    fi
    docker import \
        --change 'CMD ["bash"]' \
        --change "LABEL $LABEL_KEY=$ROOTFS_KEY" \
        --message "debootstrap --variant=minbase $SUITE" \
        - "$BASE_TAG" <"$ROOTFS_TAR" >/dev/null \
        || die "docker import of $ROOTFS_TAR failed"
    done_step "imported $(image_id "$BASE_TAG" | cut -c1-19)"
else
    done_step "exists, up to date"
fi

# ---------------------------------------------------------------- derived images
build_image() { # tag context-subdir parent-tag
    local tag="$1" ctx="$DOCKER_CTX/$2" parent="$3" recipe reason blog
    [ -f "$ctx/Dockerfile" ] || die "missing $ctx/Dockerfile"
    step "image $tag"
    recipe="$(hash_str "$(hash_dir "$ctx") parent=$(image_id "$parent")")"
    if ! reason="$(needs_build "$tag" "$recipe")"; then
        done_step "exists, up to date"
        return 0
    fi
    blog="$BUILD_LOG_DIR/build-$2.log"
    log "  building: $reason (log: $blog)"
    if ! docker build --network host --pull=false --force-rm \
            --label "$LABEL_KEY=$recipe" -t "$tag" "$ctx" >"$blog" 2>&1 </dev/null; then
        show_tail "$blog"
        die "docker build of $tag failed (log: $blog)"
    fi
    done_step "built $(image_id "$tag" | cut -c1-19)"
}

build_image isolate-local/postgres:15 postgres "$BASE_TAG"
build_image isolate-local/redis:7 redis "$BASE_TAG"
build_image isolate-local/python:3 python "$BASE_TAG"

# Remove untagged leftovers of our own earlier builds (label-filtered).
docker image prune -f --filter "label=$LABEL_KEY" >/dev/null 2>&1 || true

log "all done in $((SECONDS - T0))s: $BASE_TAG isolate-local/postgres:15 isolate-local/redis:7 isolate-local/python:3"
