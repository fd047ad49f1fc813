#!/bin/sh
# mmdebstrap customize hook of the base image: $1 is the new root file system.
set -eu
root=$1
# The fixed user of every studio tool (uid/gid 1000): images run their tool as it, so a
# session's files in the checkpointed upper directory belong to it, never to root.
chroot "$root" useradd --uid 1000 --user-group --create-home --shell /bin/bash studio
mkdir -p "$root/workspace"
chroot "$root" chown studio:studio /workspace
# What a build leaves that a session never reads.
rm -rf "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/cache/debconf/*-old \
    "$root"/var/lib/dpkg/*-old
