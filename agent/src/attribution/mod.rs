//! Attribution: who a connection belongs to — the process (from /proc),
//! what its cgroup path says, which workload's cgroups hold it, and the
//! Kubernetes pod behind it.

pub mod cgroup_info;
pub mod cgroups;
pub mod kube;
pub mod process;
