//! The processes a site runs: the [`primary`] (`drblk serve`: the data path plus
//! replication) and the [`secondary`] (`drblk secondary`: the link's server in front of the
//! replica store), and the role changes between them: [`promote`] (failover), [`role`]
//! (what `drblk serve` may write), [`rejoin`] (an old primary coming back as a secondary).

pub mod primary;
pub mod promote;
pub mod rejoin;
pub mod role;
pub mod secondary;
