#!/bin/sh
# The SSH fleet benchmark's OpenSSH peer: the same five steps as cd's
# SshDeployer (upload, checksum, switch, restart, health check) on every host
# in parallel, one `ssh` per host carrying all steps (the fastest way to do
# it with the OpenSSH client).
#
# usage: ssh_fleet_openssh.sh SSH_CONFIG ARTIFACT VERSION HOSTS_FILE
#   HOSTS_FILE: one "<ssh-config host alias> <deploy root>" per line.
set -u
cfg=$1 artifact=$2 version=$3 hosts=$4
sha=$(sha256sum "$artifact" | cut -d' ' -f1)
pids=""
while read -r name root; do
  ssh -F "$cfg" "$name" "set -e; R='$root'; D=\"\$R/releases/$version\";
    mkdir -p \"\$D\"; cat > \"\$D/.app.bin.part\";
    h=\$(sha256sum \"\$D/.app.bin.part\" | cut -d' ' -f1);
    [ \"\$h\" = '$sha' ] || { echo \"checksum mismatch: \$h\" >&2; exit 3; };
    mv -f \"\$D/.app.bin.part\" \"\$D/app.bin\";
    ln -sfn 'releases/$version' \"\$R/.current.tmp\"; mv -Tf \"\$R/.current.tmp\" \"\$R/current\";
    cd \"\$R/current\" && printf '%s' '$version' > \"\$R/restarted\";
    test \"\$(cat \"\$R/restarted\")\" = '$version'" < "$artifact" &
  pids="$pids $!"
done < "$hosts"
status=0
for p in $pids; do wait "$p" || status=1; done
exit $status
