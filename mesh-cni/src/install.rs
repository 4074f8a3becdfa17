//! Installing the plugin into the node's CNI configuration: find the primary CNI's config
//! (the lexically first `.conf`/`.conflist` in the conf dir, as kubelet picks it), append our
//! entry as the chain's last plugin, and put it back whenever the primary rewrites the file;
//! remove it on uninstall. Owns the conf dir's files only.
