pub mod path;
pub mod routes;
