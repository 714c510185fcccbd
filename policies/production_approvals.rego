# Production needs two approvals by two different people.
#
# Input: input.environment; input.approvals, the decisions recorded so far
# in this run ({node, approver, decision, comment, at}).
#
# Data (optional): data.policy_config.required_approvals (default 2),
# data.policy_config.production_environments (default ["production"]).
package cd.approvals

required := n if n := data.policy_config.required_approvals

required := 2 if not data.policy_config.required_approvals

production := {e | some e in data.policy_config.production_environments} if data.policy_config.production_environments

production := {"production"} if not data.policy_config.production_environments

approvers := {a.approver | some a in input.approvals; a.decision == "approve"}

rejected_by := {a.approver | some a in input.approvals; a.decision == "reject"}

deny contains msg if {
	input.environment in production
	count(approvers) < required
	msg := sprintf("%s needs %d approvals by different people, has %d%s", [input.environment, required, count(approvers), listed(approvers)])
}

deny contains msg if {
	input.environment in production
	some who in rejected_by
	msg := sprintf("%s rejected this release", [who])
}

listed(s) := "" if count(s) == 0

listed(s) := sprintf(" (%s)", [concat(", ", sort(s))]) if count(s) > 0
