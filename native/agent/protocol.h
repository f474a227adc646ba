/* Generated from src/agent-protocol/protocol.json by `npm run protocol`: do not edit. */
#ifndef CLADE_PROTOCOL_H
#define CLADE_PROTOCOL_H

#define PROTO_VERSION 1
#define PROTO_MAGIC "CLD1"
#define HDR_LEN 16
#define TOKEN_LEN 32
#define FRAME_MAX 1048576u

enum msg_type {
	T_HELLO = 0x01,
	T_EXEC = 0x02,
	T_STDIN = 0x03,
	T_SIGNAL = 0x04,
	T_READ_FILE = 0x05,
	T_WRITE_OPEN = 0x06,
	T_WRITE_DATA = 0x07,
	T_WRITE_CLOSE = 0x08,
	T_LIST = 0x09,
	T_STAT = 0x0a,
	T_MKDIR = 0x0b,
	T_REMOVE = 0x0c,
	T_SHUTDOWN = 0x0d,
	T_FORK_FIXUP = 0x0e,
	T_OK = 0x80,
	T_ERROR = 0x81,
	T_STDOUT = 0x82,
	T_STDERR = 0x83,
	T_EXIT = 0x84,
	T_FILE_DATA = 0x85,
};

enum tag {
	F_ARGV = 1,
	F_SHELL = 2,
	F_ENV = 3,
	F_CWD = 4,
	F_TIMEOUT_MS = 5,
	F_STDIN_OPEN = 6,
	F_PID = 7,
	F_EXIT_CODE = 8,
	F_SIGNAL = 9,
	F_TIMED_OUT = 10,
	F_TARGET = 11,
	F_PATH = 12,
	F_MODE = 13,
	F_SIZE = 14,
	F_TYPE = 15,
	F_MTIME_MS = 16,
	F_NAME = 17,
	F_ENTRY = 18,
	F_RECURSIVE = 19,
	F_CODE = 20,
	F_MESSAGE = 21,
	F_ERRNO = 22,
	F_PROTO_VERSION = 23,
	F_AGENT_VERSION = 24,
	F_SEED = 25,
	F_TIME_NS = 26,
	F_HOSTNAME = 27,
	F_SANDBOX_ID = 28,
	F_NEW_TOKEN = 29,
	F_TRUNCATED = 30,
	F_CREATED = 31,
	F_UPTIME_MS = 32,
	F_LAST_ID = 33,
	F_LIMIT = 34,
	F_DISCARD = 35,
	F_TAG_MAX = F_DISCARD,
};

enum entry_type {
	E_FILE = 1,
	E_DIR = 2,
	E_SYMLINK = 3,
	E_OTHER = 4,
};

#endif
