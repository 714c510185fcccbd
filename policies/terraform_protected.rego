# No delete or replace of a protected resource type in a Terraform plan.
#
# Input: input.terraform_plan, the typed plan of a TerraformPlanStage
# (resource_changes[].type / .address / .actions) or the raw JSON of
# `terraform show -json <planfile>` (resource_changes[].change.actions).
#
# Data (optional): data.policy_config.protected_resource_types, a list of
# resource types replacing the default list below;
# data.policy_config.protected_addresses, resource addresses protected
# whatever their type.
package cd.terraform

default_protected_types := {
	"aws_db_instance",
	"aws_rds_cluster",
	"aws_dynamodb_table",
	"aws_s3_bucket",
	"aws_kms_key",
	"aws_efs_file_system",
	"google_sql_database_instance",
	"google_storage_bucket",
	"google_kms_crypto_key",
	"azurerm_mssql_database",
	"azurerm_postgresql_flexible_server",
	"azurerm_storage_account",
	"azurerm_key_vault",
}

configured_types := {t | some t in data.policy_config.protected_resource_types}

protected_types := configured_types if data.policy_config.protected_resource_types

protected_types := default_protected_types if not data.policy_config.protected_resource_types

protected_addresses := {a | some a in data.policy_config.protected_addresses}

# Terraform's action list, from the typed plan or the raw one.
actions(rc) := rc.actions

actions(rc) := rc.change.actions if not rc.actions

destroys(rc) if "delete" in actions(rc)

protected(rc) if rc.type in protected_types

protected(rc) if rc.address in protected_addresses

deny contains msg if {
	some rc in input.terraform_plan.resource_changes
	destroys(rc)
	protected(rc)
	verb := replace_or_delete(actions(rc))
	msg := sprintf("%s would be %s: %s is a protected resource type", [rc.address, verb, rc.type])
}

replace_or_delete(a) := "replaced" if "create" in a

replace_or_delete(a) := "deleted" if not "create" in a

warn contains msg if {
	input.terraform_plan.partial
	msg := "the Terraform plan is partial (show_plan off): only changed resources were checked"
}
