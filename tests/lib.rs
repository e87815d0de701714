
mod dump;
