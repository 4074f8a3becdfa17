//! The CNI plugin (spec 1.0: ADD, DEL, CHECK, VERSION; chained, `prevResult` passed through).
//! Owns reading the runtime's environment and netconf, the plugin's skip rules, the call to the
//! agent, and the spec's result/error output. Must not touch a netns or the API itself.
