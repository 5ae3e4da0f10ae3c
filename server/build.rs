//! Rebuilds the server when a migration is added or changed: `sqlx::migrate!` embeds the
//! migration directories at compile time but cannot ask Cargo to watch them.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
