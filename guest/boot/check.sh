#!/bin/sh
# Re-assembles the committed boot sectors and compares them byte for byte with
# the committed binaries. Needs GNU binutils (as, ld); exits 0 with a
# "skipped" line where they are missing.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fixtures="$here/../../tests/fixtures/boot"
if ! command -v as >/dev/null 2>&1 || ! command -v ld >/dev/null 2>&1; then
    echo "skipped: GNU as/ld (binutils) not found"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for pair in "$here/workload" "$here/interrupts" "$fixtures/ab-fixed"; do
    name=$(basename "$pair")
    as --32 -o "$tmp/$name.o" "$pair.S"
    ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o "$tmp/$name.bin" "$tmp/$name.o"
    if cmp -s "$tmp/$name.bin" "$pair.bin"; then
        echo "ok: $name.bin matches $name.S"
    else
        echo "MISMATCH: $name.bin is not what $name.S assembles to" >&2
        status=1
    fi
done
exit $status
