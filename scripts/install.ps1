<#
.SYNOPSIS
Installs the Drover agent on this Windows machine as a service.

.DESCRIPTION
Fetches the newest stable Windows build from the server (GET /api/v1/agent/install with
the enrollment token), verifies its SHA-256 (and with -PublicKey its signature, recording
its release counter so the agent never installs an older build), installs it as
%ProgramFiles%\Drover\drover-agent.exe and runs `drover-agent service install`, which
writes %ProgramData%\Drover\agent.conf and registers the drover-agent service (started
at boot as LocalSystem, restarted on failure) and starts it. The agent keeps its state
in %ProgramData%\Drover\Agent, readable only by SYSTEM and Administrators. Run it in an
elevated PowerShell.

.EXAMPLE
$env:DROVER_ENROLL_TOKEN = 'TOKEN'; .\install.ps1 -Server https://updates.example.com

.EXAMPLE
.\install.ps1 -Server https://updates.example.com -EnrollTokenFile token.txt -PublicKey HEX -CaFile ca.pem
#>
param(
    # The server's URL.
    [Parameter(Mandatory = $true)][string]$Server,
    # A file holding the site enrollment token (else DROVER_ENROLL_TOKEN is used).
    [string]$EnrollTokenFile,
    # Pin the release key: the agent installs only builds it signed.
    [string]$PublicKey,
    # A second trusted release key, while rotating.
    [string]$PublicKey2,
    # Trust only this CA for the server (copied beside the config; also used for this
    # script's own requests).
    [string]$CaFile,
    # Allow an http:// server (the token and the agent's secret then cross the network
    # in clear text).
    [switch]$Insecure,
    [string]$InstallDir = (Join-Path $env:ProgramFiles 'Drover'),
    [string]$ConfigDir = (Join-Path $env:ProgramData 'Drover')
)
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

if ($EnrollTokenFile) {
    $token = (Get-Content -Raw -Path $EnrollTokenFile).Trim()
} else {
    $token = $env:DROVER_ENROLL_TOKEN
}
if (-not $token) { throw 'install.ps1: give the enrollment token with -EnrollTokenFile or DROVER_ENROLL_TOKEN' }
foreach ($key in @($PublicKey, $PublicKey2)) {
    if ($key -and $key -notmatch '^[0-9a-fA-F]{64}$') {
        throw "install.ps1: a public key is 64 hex digits (drover keygen prints it): $key"
    }
}
$Server = $Server.TrimEnd('/')
if ($Server -like 'http://*') {
    if (-not $Insecure) {
        throw "install.ps1: $Server is plain http: the enrollment token and the agent's secret would cross the network readable; use https:// (-CaFile for a private CA), or -Insecure on a network you trust"
    }
} elseif ($Server -notlike 'https://*') {
    throw "install.ps1: -Server must be an https:// URL: $Server"
}
if ($PublicKey2 -and -not $PublicKey) { throw 'install.ps1: -PublicKey2 is a second key: give -PublicKey too' }
$stateDir = Join-Path $env:ProgramData 'Drover\Agent'
[Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12

if ($CaFile) {
    # This script's requests trust only the given CA, as the agent will.
    $ca = New-Object System.Security.Cryptography.X509Certificates.X509Certificate2 (Resolve-Path $CaFile).Path
    [Net.ServicePointManager]::ServerCertificateValidationCallback = {
        param($sender, $certificate, $chain, $errors)
        $pinned = New-Object System.Security.Cryptography.X509Certificates.X509Chain
        $pinned.ChainPolicy.RevocationMode = 'NoCheck'
        $pinned.ChainPolicy.VerificationFlags = 'AllowUnknownCertificateAuthority'
        [void]$pinned.ChainPolicy.ExtraStore.Add($ca)
        if (-not $pinned.Build($certificate)) { return $false }
        $root = $pinned.ChainElements[$pinned.ChainElements.Count - 1].Certificate
        return $root.Thumbprint -eq $ca.Thumbprint
    }.GetNewClosure()
}

Write-Host "asking $Server for the newest windows/amd64 build"
$answer = Invoke-RestMethod -UseBasicParsing -Headers @{ Authorization = "Bearer $token" } `
    -Uri "$Server/api/v1/agent/install?os=windows&arch=amd64"
if (-not $answer.version -or -not $answer.url -or -not $answer.sha256) {
    throw "install.ps1: unexpected answer: $answer"
}

New-Item -ItemType Directory -Force -Path $InstallDir, $ConfigDir | Out-Null
$download = Join-Path $InstallDir '.drover-agent.download.exe'
Write-Host "downloading drover-agent $($answer.version)"
Invoke-WebRequest -UseBasicParsing -Uri $answer.url -OutFile $download
$actual = (Get-FileHash -Algorithm SHA256 -Path $download).Hash.ToLowerInvariant()
if ($actual -ne $answer.sha256.ToLowerInvariant()) {
    Remove-Item -Force $download
    throw "install.ps1: checksum mismatch: expected $($answer.sha256), got $actual; nothing installed"
}
if ($PublicKey) {
    # The new agent checks the signature against its own bytes, version and platform
    # with the pinned keys and records the counter: from its first start it refuses any
    # signature at or below it (an old build replayed by the server).
    if (-not $answer.signature) {
        Remove-Item -Force $download
        throw "install.ps1: $($answer.version) is not signed, but -PublicKey was given: the agent would refuse every unsigned build"
    }
    $signatureFile = Join-Path $InstallDir '.drover-agent.install.sig'
    [IO.File]::WriteAllText($signatureFile, $answer.signature)
    $keys = @('--public-key', $PublicKey)
    if ($PublicKey2) { $keys += @('--public-key-2', $PublicKey2) }
    & $download record-release --state-dir $stateDir @keys --signature $signatureFile | Out-Host
    $recorded = $LASTEXITCODE -eq 0
    Remove-Item -Force $signatureFile
    if (-not $recorded) {
        Remove-Item -Force $download
        throw "install.ps1: the signature of $($answer.version) does not hold; nothing installed"
    }
}

$exe = Join-Path $InstallDir 'drover-agent.exe'
if (Get-Service -Name 'drover-agent' -ErrorAction SilentlyContinue) {
    # A reinstall: the running service holds the executable.
    & $exe service uninstall | Out-Host
    Start-Sleep -Seconds 2
}
Move-Item -Force -Path $download -Destination $exe

# The token never goes on a command line, where any user can read it: the agent writes
# its config and registers the service without it, then the token is added to the
# file, which the agent made readable by SYSTEM and Administrators only.
$flags = @('--server', $Server, '--state-dir', $stateDir)
if ($PublicKey) { $flags += @('--public-key', $PublicKey) }
if ($PublicKey2) { $flags += @('--public-key-2', $PublicKey2) }
if ($CaFile) {
    $pinnedCa = Join-Path $ConfigDir 'ca.pem'
    Copy-Item -Force -Path $CaFile -Destination $pinnedCa
    $flags += @('--ca-file', $pinnedCa)
}
$config = Join-Path $ConfigDir 'agent.conf'
& $exe service install --no-start --config $config -- @flags | Out-Host
if ($LASTEXITCODE -ne 0) { throw 'install.ps1: drover-agent service install failed' }
Add-Content -Path $config -Value "enroll-token = $token"
& $exe service start | Out-Host
if ($LASTEXITCODE -ne 0) { throw 'install.ps1: drover-agent service start failed' }
Write-Host "installed $exe ($($answer.version)); the drover-agent service is running: Get-Service drover-agent"
