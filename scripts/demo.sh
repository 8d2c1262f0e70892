#!/usr/bin/env bash
# kiln's main job on one host: start `kiln server` (unless it runs),
# build examples/python-http into a microVM image, run a microVM from its
# snapshot and call it over HTTPS through its own endpoint. Safe to repeat:
# the server and the image are reused, each run starts one new microVM.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${DATA_DIR:-/var/lib/kiln}"
API="${KILN_API:-127.0.0.1:9090}"
ENDPOINT="${KILN_ENDPOINT:-127.0.0.1:8443}"
KILN=(bin/kiln --data-dir "$DATA_DIR")
export AWS_SHARED_CREDENTIALS_FILE="$DATA_DIR/credentials"
CLI=("${KILN[@]}" --endpoint-url "http://$API")
say() { printf '\n==> %s\n' "$*"; }

if ! curl -s -o /dev/null "http://$API/"; then
  say "starting kiln server (log: $DATA_DIR/server.log)"
  mkdir -p "$DATA_DIR"
  setsid "${KILN[@]}" server --api-addr "$API" --endpoint-addr "$ENDPOINT" >"$DATA_DIR/server.log" 2>&1 < /dev/null &
  for _ in $(seq 1 300); do
    grep -q "serving at" "$DATA_DIR/server.log" 2>/dev/null && break
    if ! kill -0 $! 2>/dev/null; then cat "$DATA_DIR/server.log" >&2; exit 1; fi
    sleep 0.2
  done
fi

BASE="$("${CLI[@]}" list-managed-microvm-images | jq -r '.items[0].imageArn')"
IMAGE=hello-python
if ! "${CLI[@]}" get-microvm-image --image-identifier "$IMAGE" >/dev/null 2>&1; then
  say "building $IMAGE from examples/python-http (apt-get install python3 in a build microVM; minutes under TCG)"
  "${CLI[@]}" create-microvm-image --name "$IMAGE" --code examples/python-http \
    --base-image-arn "$BASE" --build-role-arn "arn:aws:iam::123456789012:role/kiln-build" \
    --resources '[{"minimumMemoryInMiB":512}]' --wait >/dev/null
fi
STATE="$("${CLI[@]}" get-microvm-image --image-identifier "$IMAGE" | jq -r .state)"
if [ "$STATE" != CREATED ] && [ "$STATE" != UPDATED ]; then
  echo "image $IMAGE is $STATE; see: bin/kiln logs $IMAGE" >&2
  exit 1
fi

say "running a microVM from the snapshot of $IMAGE"
VM="$("${CLI[@]}" run-microvm --image-identifier "$IMAGE" \
  --idle-policy '{"maxIdleDurationSeconds":300,"suspendedDurationSeconds":3600,"autoResumeEnabled":true}' \
  --maximum-duration-in-seconds 28800 --wait)"
ID="$(jq -r .microvmId <<<"$VM")"
URL="$(jq -r .endpoint <<<"$VM")"
TOKEN="$("${CLI[@]}" create-microvm-auth-token --microvm-identifier "$ID" \
  --allowed-ports '[{"port":8080}]' --expiration-in-minutes 60 | jq -r '.authToken["X-aws-proxy-auth"] // .token // empty')"

say "GET $URL (TLS verified against $DATA_DIR/ca.pem)"
curl -sS --fail --cacert "$DATA_DIR/ca.pem" -H "X-aws-proxy-auth: $TOKEN" "$URL/"
echo
cat <<MSG

microVM $ID is running at $URL
  call it:      curl --cacert $DATA_DIR/ca.pem -H 'X-aws-proxy-auth: $TOKEN' $URL/
  inspect it:   AWS_SHARED_CREDENTIALS_FILE=$AWS_SHARED_CREDENTIALS_FILE ${KILN[*]} get-microvm --microvm-identifier $ID
  web console:  http://$API/console/ (sign in with the key in $AWS_SHARED_CREDENTIALS_FILE)
  end it:       AWS_SHARED_CREDENTIALS_FILE=$AWS_SHARED_CREDENTIALS_FILE ${KILN[*]} terminate-microvm --microvm-identifier $ID
  stop kiln:    pkill -f 'bin/kiln --data-dir $DATA_DIR server'
MSG
