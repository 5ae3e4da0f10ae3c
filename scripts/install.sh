#!/usr/bin/env bash
# install.sh --server URL --enroll-token-file FILE [options]
# Installs the Drover agent on this machine: fetches the newest stable build for its
# os/arch from the server, verifies its SHA-256 (and, with --public-key, its signature,
# recording its release counter so the agent never installs an older build), installs
# it, writes the agent's config file and (unless --no-systemd) the systemd unit
# (`drover-agent service install`), and starts the service.
#
# The enrollment token is read from FILE ("-" for standard input) or from the
# environment variable DROVER_ENROLL_TOKEN, never from the command line, where every
# user could read it in ps.
#
# Options:
#   --prefix DIR       install the binary in DIR/bin (default /usr/local)
#   --config-dir DIR   where agent.conf goes (default /etc/drover-agent)
#   --state-dir DIR    the agent's state directory (default /var/lib/drover-agent)
#   --no-systemd       install the binary and config only; print how to start the agent
#   --public-key HEX   pin the release key: the agent installs only builds it signed
#   --public-key-2 HEX a second trusted release key, while rotating
#   --ca-file PATH     trust only this CA for the server (copied beside the config; also
#                      used for this script's own requests)
#   --insecure         allow an http:// server (the token and the agent's secret then
#                      cross the network in clear text)
set -euo pipefail

server=
token=${DROVER_ENROLL_TOKEN:-}
token_file=
insecure=no
prefix=/usr/local
config_dir=/etc/drover-agent
state_dir=/var/lib/drover-agent
systemd=yes
public_key=
public_key_2=
ca_file=

die() { echo "install.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
    case "$1" in
        --server) server=${2:?--server needs a URL}; shift 2 ;;
        --enroll-token | --enroll-token=*)
            die "--enroll-token would show the token to every user in ps: put it in a file and pass --enroll-token-file FILE (or - for standard input), or set DROVER_ENROLL_TOKEN" ;;
        --enroll-token-file) token_file=${2:?--enroll-token-file needs a file}; shift 2 ;;
        --insecure) insecure=yes; shift ;;
        --prefix) prefix=${2:?}; shift 2 ;;
        --config-dir) config_dir=${2:?}; shift 2 ;;
        --state-dir) state_dir=${2:?}; shift 2 ;;
        --no-systemd) systemd=no; shift ;;
        --public-key) public_key=${2:?--public-key needs a hex key}; shift 2 ;;
        --public-key-2) public_key_2=${2:?--public-key-2 needs a hex key}; shift 2 ;;
        --ca-file) ca_file=${2:?--ca-file needs a path}; shift 2 ;;
        -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -n "$server" ] || die "--server is required"
if [ -n "$token_file" ]; then
    if [ "$token_file" = - ]; then
        token=$(head -n 1)
    else
        [ -r "$token_file" ] || die "cannot read --enroll-token-file $token_file"
        token=$(head -n 1 "$token_file")
    fi
fi
token=$(printf '%s' "$token" | tr -d '[:space:]')
[ -n "$token" ] || die "no enrollment token: pass --enroll-token-file FILE or set DROVER_ENROLL_TOKEN"
server=${server%/}
case "$server" in
    https://*) ;;
    http://*)
        [ "$insecure" = yes ] \
            || die "$server is plain http: the enrollment token and the agent's secret would cross the network readable; use https:// (--ca-file for a private CA), or --insecure on a network you trust" ;;
    *) die "--server must be an https:// URL: $server" ;;
esac
command -v curl >/dev/null || die "curl is required"
command -v sha256sum >/dev/null || die "sha256sum is required"
for key in "$public_key" "$public_key_2"; do
    [ -z "$key" ] || printf '%s' "$key" | grep -Eq '^[0-9a-fA-F]{64}$' \
        || die "a public key is 64 hex digits (drover keygen prints it): $key"
done
curl_tls=()
if [ -n "$ca_file" ]; then
    [ -r "$ca_file" ] || die "cannot read --ca-file $ca_file"
    curl_tls=(--cacert "$ca_file")
fi

case "$(uname -s)" in
    Linux) os=linux ;;
    Darwin) os=macos ;;
    *) die "unsupported system $(uname -s)" ;;
esac
case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "unsupported architecture $(uname -m)" ;;
esac

echo "asking $server for the newest $os/$arch build"
# The header through standard input: curl's command line is visible in ps too.
answer=$(printf 'Authorization: Bearer %s\n' "$token" | curl -fsS "${curl_tls[@]}" -H @- \
    "$server/api/v1/agent/install?os=$os&arch=$arch") \
    || die "the server refused: check --server and the enrollment token"
field() { printf '%s' "$answer" | sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p"; }
version=$(field version)
url=$(field url)
sha256=$(field sha256)
# The signature document is a JSON string whose only escapes are its line breaks.
signature=$(field signature)
[ "$signature" = null ] && signature=
[ -n "$version" ] && [ -n "$url" ] && [ -n "$sha256" ] || die "unexpected answer: $answer"
if [ -n "$public_key" ] && [ -z "$signature" ]; then
    die "$version is not signed, but --public-key was given: the agent would refuse every unsigned build; sign it (drover sign) or install without a key"
fi

bin_dir="$prefix/bin"
mkdir -p "$bin_dir" "$config_dir"
# The state directory holds the agent's secret: its user only, also when it exists.
(umask 077 && mkdir -p "$state_dir")
chmod 700 "$state_dir"
download="$bin_dir/.drover-agent.download.$$"
signature_file="$state_dir/.install.sig.$$"
trap 'rm -f "$download" "$signature_file"' EXIT
echo "downloading drover-agent $version"
curl -fsS "${curl_tls[@]}" --retry 5 -o "$download" "$url" || die "download of $url failed"
actual=$(sha256sum "$download" | cut -d' ' -f1)
[ "$actual" = "$sha256" ] || die "checksum mismatch: expected $sha256, got $actual; nothing installed"
chmod 755 "$download"
if [ -n "$public_key" ]; then
    # The new agent checks the signature against its own bytes, version and platform
    # with the pinned keys, and records the counter: from its first start it refuses
    # any signature at or below it (an old build replayed by the server).
    (umask 077 && printf '%b' "$signature" >"$signature_file")
    keys=(--public-key "$public_key")
    [ -z "$public_key_2" ] || keys+=(--public-key-2 "$public_key_2")
    "$download" record-release --state-dir "$state_dir" "${keys[@]}" --signature "$signature_file" \
        || die "the signature of $version does not hold; nothing installed"
fi
mv -f "$download" "$bin_dir/drover-agent"
rm -f "$signature_file"
trap - EXIT

config="$config_dir/agent.conf"
umask 077
if [ -n "$ca_file" ]; then
    cp "$ca_file" "$config_dir/ca.pem.tmp"
    mv -f "$config_dir/ca.pem.tmp" "$config_dir/ca.pem"
fi
{
    echo "# Drover agent settings: keys are the long flags of \`drover-agent run\`."
    echo "server = $server"
    echo "enroll-token = $token"
    echo "state-dir = $state_dir"
    [ -z "$public_key" ] || echo "public-key = $public_key"
    [ -z "$public_key_2" ] || echo "public-key-2 = $public_key_2"
    [ -z "$ca_file" ] || echo "ca-file = $config_dir/ca.pem"
    echo "# no-auto-update = true"
} > "$config.tmp"
mv -f "$config.tmp" "$config"
echo "installed $bin_dir/drover-agent ($version) and $config"

if [ "$systemd" = yes ]; then
    command -v systemctl >/dev/null || die "systemctl not found; rerun with --no-systemd"
    # The agent writes its own unit and the same config file from the same settings;
    # the token is added to the file afterwards, never passed on a command line.
    flags=(--server "$server" --state-dir "$state_dir")
    [ -z "$public_key" ] || flags+=(--public-key "$public_key")
    [ -z "$public_key_2" ] || flags+=(--public-key-2 "$public_key_2")
    [ -z "$ca_file" ] || flags+=(--ca-file "$config_dir/ca.pem")
    "$bin_dir/drover-agent" service install --no-start --config "$config" -- "${flags[@]}" \
        || die "drover-agent service install failed"
    printf 'enroll-token = %s\n' "$token" >>"$config"
    "$bin_dir/drover-agent" service start || die "drover-agent service start failed"
    echo "drover-agent is running: systemctl status drover-agent"
else
    echo "start it with: $bin_dir/drover-agent run --config $config"
fi
