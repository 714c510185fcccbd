# No secret in the release: every finding of the secret scan denies
# (allowlisted ones are not findings). Files the scan skipped are warnings.
#
# Input: input.secrets, a SecretScan report ({files, bytes, findings:
# [{file, line, rule, fingerprint, redacted}], skipped: [{file, reason}]}).
package cd.secrets

deny contains msg if {
	some f in input.secrets.findings
	msg := sprintf("secret at %s:%d (%s, %s, fingerprint %s)", [f.file, f.line, f.rule, f.redacted, f.fingerprint])
}

warn contains msg if {
	some s in input.secrets.skipped
	msg := sprintf("not scanned: %s (%s)", [s.file, s.reason])
}

warn contains "no secret scan result in the input" if not input.secrets
