# No component with a critical vulnerability (CVSS v3 base score 9.0 or
# more, or the database's "critical"); high ones are warnings. Advisories
# an ignore entry covers (with its reason and expiry) are not counted.
#
# Input: input.advisories, an AdvisoryCheck report (failing and
# below_threshold matches: {id, aliases, component: {ecosystem, name,
# version}, level, score, fixed}).
package cd.vulnerabilities

matches contains m if some m in input.advisories.failing

matches contains m if some m in input.advisories.below_threshold

deny contains msg if {
	some m in matches
	m.level == "critical"
	msg := sprintf("%s: critical vulnerability %s (%s)%s", [component(m), m.id, m.summary, fixed_in(m)])
}

warn contains msg if {
	some m in matches
	m.level == "high"
	msg := sprintf("%s: high vulnerability %s (%s)%s", [component(m), m.id, m.summary, fixed_in(m)])
}

warn contains "no advisory check result in the input" if not input.advisories

component(m) := sprintf("%s@%s", [m.component.name, m.component.version])

fixed_in(m) := "" if count(m.fixed) == 0

fixed_in(m) := sprintf(", fixed in %s", [concat(", ", m.fixed)]) if count(m.fixed) > 0
