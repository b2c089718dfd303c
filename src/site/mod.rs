//! The processes a site runs: the [`primary`] (`drblk serve`: the data path plus
//! replication) and the [`secondary`] (`drblk secondary`: the link's server in front of the
//! replica store).

pub mod primary;
pub mod promote;
pub mod rejoin;
pub mod role;
pub mod secondary;
