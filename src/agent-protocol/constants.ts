// Generated from src/agent-protocol/protocol.json by `npm run protocol`: do not edit.
// docs/protocol.md is the specification.
export const PROTOCOL_VERSION = 1;
export const FRAME_MAGIC = 0x31444c43; // "CLD1" little-endian
export const HEADER_SIZE = 16;
export const TOKEN_SIZE = 32;
export const MAX_PAYLOAD = 1048576;

export const MessageType = {
  HELLO: 0x01,
  EXEC: 0x02,
  STDIN: 0x03,
  SIGNAL: 0x04,
  READ_FILE: 0x05,
  WRITE_OPEN: 0x06,
  WRITE_DATA: 0x07,
  WRITE_CLOSE: 0x08,
  LIST: 0x09,
  STAT: 0x0a,
  MKDIR: 0x0b,
  REMOVE: 0x0c,
  SHUTDOWN: 0x0d,
  FORK_FIXUP: 0x0e,
  OK: 0x80,
  ERROR: 0x81,
  STDOUT: 0x82,
  STDERR: 0x83,
  EXIT: 0x84,
  FILE_DATA: 0x85,
} as const;
export type MessageType = (typeof MessageType)[keyof typeof MessageType];

export const Tag = {
  ARGV: 1,
  SHELL: 2,
  ENV: 3,
  CWD: 4,
  TIMEOUT_MS: 5,
  STDIN_OPEN: 6,
  PID: 7,
  EXIT_CODE: 8,
  SIGNAL: 9,
  TIMED_OUT: 10,
  TARGET: 11,
  PATH: 12,
  MODE: 13,
  SIZE: 14,
  TYPE: 15,
  MTIME_MS: 16,
  NAME: 17,
  ENTRY: 18,
  RECURSIVE: 19,
  CODE: 20,
  MESSAGE: 21,
  ERRNO: 22,
  PROTO_VERSION: 23,
  AGENT_VERSION: 24,
  SEED: 25,
  TIME_NS: 26,
  HOSTNAME: 27,
  SANDBOX_ID: 28,
  NEW_TOKEN: 29,
  TRUNCATED: 30,
  CREATED: 31,
  UPTIME_MS: 32,
  LAST_ID: 33,
  LIMIT: 34,
  DISCARD: 35,
} as const;
export type Tag = (typeof Tag)[keyof typeof Tag];

export const EntryType = {
  FILE: 1,
  DIR: 2,
  SYMLINK: 3,
  OTHER: 4,
} as const;
export type EntryType = (typeof EntryType)[keyof typeof EntryType];
