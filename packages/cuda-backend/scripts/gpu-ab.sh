#!/bin/bash
# On a GPU host, after gpu-run.sh's environment (source .gpuhost/enter.sh) and a synthesized
# /tmp/gpt-oss-20b: the decode step's graph replay of this tree's build against another build,
# alternating (A B A B) so that drift over the call shows. The other build is a tarball of its
# packages/*/dist and the addon (tar -cJf old.tar.xz packages/*/dist packages/cuda-backend/build/Release/moeflash_cuda.node),
# unpacked into a copy of this tree.
#   AB_OTHER=.gpuhost/old.tar.xz bash packages/cuda-backend/scripts/gpu-ab.sh
set -u
O=${OUT:-/tmp/moeflash-out}
mkdir -p "$O"
other=/tmp/moeflash-ab-other
rm -rf "$other" && cp -a . "$other" && tar -C "$other" -xJf "${AB_OTHER:?tarball of the other build}"
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for side in this other; do
    dir=.
    [ "$side" = other ] && dir=$other
    (cd "$dir" && PROFILE_CLASSES=lm PROFILE_SKIPPABLE=lm PROFILE_ENV="same:MOEFLASH_PDL=1" timeout "${AB_S:-120}" \
      node packages/cuda-backend/bench/step-profile.mjs /tmp/gpt-oss-20b 1 640 "$O/ab-$side-$round.json" 2>&1 |
      grep -v loading | sed "s/^/$side $round: /")
  done
done
