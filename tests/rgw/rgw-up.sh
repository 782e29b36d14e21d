#!/bin/bash
# Single-process-per-daemon Ceph (1 mon, 1 memstore OSD, 1 radosgw), no cephx, loopback only.
# usage: rgw-up.sh DIR [MON_PORT] [RGW_PORT]   -> S3 at http://127.0.0.1:$RGW_PORT  key testkey/testsecret
set -euo pipefail
D=${1:?dir}; MONP=${2:-40000}; RGWP=${3:-8000}
mkdir -p $D/{run,log,mon.a,osd.0,rgw}; FSID=$(uuidgen)
cat > $D/ceph.conf <<CONF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MONP
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr1 = false
ms mon client mode = crc
ms client mode = crc
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
[mon.a]
mon data = $D/mon.a
[osd]
osd objectstore = memstore
memstore device bytes = 4294967296
osd data = $D/osd.\$id
osd max object name len = 460
osd max object namespace len = 64
[client.rgw.a]
# tcp_nodelay: otherwise every small response waits ~40 ms (Nagle + delayed ACK)
rgw frontends = beast endpoint=127.0.0.1:$RGWP tcp_nodelay=1
rgw data = $D/rgw
CONF
C="-c $D/ceph.conf"
monmaptool --create --fsid $FSID --addv a v2:127.0.0.1:$MONP --enable-all-features --clobber $D/run/monmap >/dev/null
ceph-mon $C --mkfs -i a --monmap $D/run/monmap
ceph-mon $C -i a
U=$(uuidgen); ID=$(timeout 30 ceph $C osd new $U)
ceph-osd $C -i $ID --mkfs --osd-uuid $U 2>/dev/null
ceph-osd $C -i $ID 2>/dev/null
radosgw $C -n client.rgw.a
for i in $(seq 1 120); do curl -sf -o /dev/null http://127.0.0.1:$RGWP/ && break; sleep 0.5; done
curl -sf -o /dev/null http://127.0.0.1:$RGWP/ || { echo "radosgw not answering on $RGWP after 60 s (see $D/log)" >&2; exit 1; }
timeout 60 radosgw-admin $C user create --uid=registry --display-name=registry --access-key=testkey --secret=testsecret >/dev/null
echo "rgw ready: http://127.0.0.1:$RGWP pids: mon $(cat $D/run/mon.a.pid) osd $(cat $D/run/osd.$ID.pid) rgw $(cat $D/run/client.rgw.a.pid)"
