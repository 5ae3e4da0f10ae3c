#!/usr/bin/env bash
# install.sh --server URL --enroll-token TOKEN [options]
# Installs the Drover agent on this machine: fetches the newest stable build for its
# os/arch from the server, verifies its SHA-256, installs it, writes the agent's config
# file and (unless --no-systemd) the systemd unit (`drover-agent service install`), and
# starts the service.
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
set -euo pipefail

server=
token=
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
        --enroll-token) token=${2:?--enroll-token needs a token}; shift 2 ;;
        --prefix) prefix=${2:?}; shift 2 ;;
        --config-dir) config_dir=${2:?}; shift 2 ;;
        --state-dir) state_dir=${2:?}; shift 2 ;;
        --no-systemd) systemd=no; shift ;;
        --public-key) public_key=${2:?--public-key needs a hex key}; shift 2 ;;
        --public-key-2) public_key_2=${2:?--public-key-2 needs a hex key}; shift 2 ;;
        --ca-file) ca_file=${2:?--ca-file needs a path}; shift 2 ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[ -n "$server" ] || die "--server is required"
[ -n "$token" ] || die "--enroll-token is required"
server=${server%/}
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
answer=$(curl -fsS "${curl_tls[@]}" -H "Authorization: Bearer $token" \
    "$server/api/v1/agent/install?os=$os&arch=$arch") \
    || die "the server refused: check --server and --enroll-token"
field() { printf '%s' "$answer" | sed -n "s/.*\"$1\":\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p"; }
version=$(field version)
url=$(field url)
sha256=$(field sha256)
[ -n "$version" ] && [ -n "$url" ] && [ -n "$sha256" ] || die "unexpected answer: $answer"

bin_dir="$prefix/bin"
mkdir -p "$bin_dir" "$config_dir"
download="$bin_dir/.drover-agent.download.$$"
trap 'rm -f "$download"' EXIT
echo "downloading drover-agent $version"
curl -fsS "${curl_tls[@]}" --retry 5 -o "$download" "$url" || die "download of $url failed"
actual=$(sha256sum "$download" | cut -d' ' -f1)
[ "$actual" = "$sha256" ] || die "checksum mismatch: expected $sha256, got $actual; nothing installed"
chmod 755 "$download"
mv -f "$download" "$bin_dir/drover-agent"
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
    # The agent writes its own unit and the same config file from the same settings.
    flags=(--server "$server" --enroll-token "$token" --state-dir "$state_dir")
    [ -z "$public_key" ] || flags+=(--public-key "$public_key")
    [ -z "$public_key_2" ] || flags+=(--public-key-2 "$public_key_2")
    [ -z "$ca_file" ] || flags+=(--ca-file "$config_dir/ca.pem")
    "$bin_dir/drover-agent" service install --config "$config" -- "${flags[@]}" \
        || die "drover-agent service install failed"
    echo "drover-agent is running: systemctl status drover-agent"
else
    echo "start it with: $bin_dir/drover-agent run --config $config"
fi
