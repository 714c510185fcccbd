//! # cd-backends
//!
//! Deployers and stores that talk to the outside world. Each backend is a
//! module behind its own cargo feature, so a user who deploys over SSH
//! compiles no Terraform or container code.
//!
//! | feature | module | what |
//! |---|---|---|
//! | `local` | [`local`] | local processes health-checked over HTTP; a TCP router for blue-green |
//! | `sqlite` | [`sqlite`] | the embedded durable store |
//! | `ssh` | [`ssh`] | Capistrano-style releases on plain SSH hosts (russh) |
//! | `terraform` | [`terraform`] | the terraform / tofu CLI |
//! | `ansible` | [`ansible`] | ansible-playbook |
#![forbid(unsafe_code)]

#[cfg(feature = "ansible")]
pub mod ansible;
#[cfg(feature = "container")]
pub mod container;
#[cfg(test)]
mod fuzz;
#[cfg(any(feature = "terraform", feature = "ansible"))]
mod history;
#[cfg(feature = "local")]
pub mod local;
#[cfg(any(feature = "terraform", feature = "ansible"))]
mod process_group;
#[cfg(feature = "router")]
pub mod router;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "ssh")]
pub mod ssh;
#[cfg(feature = "terraform")]
pub mod terraform;
