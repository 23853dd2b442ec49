#![no_std]
// Library target so tools that inspect the workspace see a lib; the programs live in main.rs.
