"""The one gateway to the host's filesystem: files.py (atomic writes, backups, locks) and
logs.py (the audit log files, read and held). Every temporary name starts with ``.`` because
kubelet runs every other file in the static pod folder."""

from kube_audit.hostfs.files import (
    can_give_files,
    ensure_dir,
    file_signature,
    give_to,
    host_lock,
    list_dirs,
    read_bytes,
    read_folder,
    read_optional,
    remove_stale_temporaries,
    remove_tree,
    take_lock,
    write_atomic,
    write_folder_atomic,
)
from kube_audit.hostfs.logs import (
    LogReader,
    audit_log_files,
    audit_log_identities,
    held_path,
    held_size,
    hold_log,
    open_log_reader,
    read_blocks,
    release_log,
)

__all__ = [
    "LogReader",
    "audit_log_files",
    "audit_log_identities",
    "can_give_files",
    "ensure_dir",
    "file_signature",
    "give_to",
    "held_path",
    "held_size",
    "hold_log",
    "host_lock",
    "list_dirs",
    "open_log_reader",
    "read_blocks",
    "read_bytes",
    "read_folder",
    "read_optional",
    "release_log",
    "remove_stale_temporaries",
    "remove_tree",
    "take_lock",
    "write_atomic",
    "write_folder_atomic",
]
