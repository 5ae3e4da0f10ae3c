//! What differs between the operating systems the agent runs on, one small module per
//! concern, so that the update logic (journal, probation, install) reads the same on
//! Linux, macOS and Windows. Nothing outside this module uses `cfg` on the target OS
//! except the service glue in `service`.

pub(crate) mod durable;
pub(crate) mod machine_id;
pub(crate) mod memory;
pub(crate) mod paths;
pub(crate) mod permissions;
pub(crate) mod process;
