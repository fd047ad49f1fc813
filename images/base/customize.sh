#!/bin/sh
# mmdebstrap customize hook of the base image: $1 is the new root file system.
set -eu
root=$1
# The fixed user of every studio tool (uid/gid 1000): images run their tool as it, so a
# session's files in the checkpointed upper directory belong to it, never to root.
chroot "$root" useradd --uid 1000 --user-group --create-home --shell /bin/bash studio
# The CAs this host added to its trust store (image.toml's host_inputs): the image trusts
# what the host trusts, so a session reaches the registries the host reaches.
if [ -d /usr/local/share/ca-certificates ]; then
    cp -R /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
mkdir -p "$root/workspace"
chroot "$root" chown studio:studio /workspace
# What a build leaves that a session never reads.
rm -rf "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/cache/debconf/*-old \
    "$root"/var/lib/dpkg/*-old
