// The daemon's wire types: TypeBox schemas that the daemon validates requests
// with and documents (OpenAPI), and whose static types the SDK's daemon client
// reads answers with. Shared by src/api and src/sdk, depending on neither.
import { Type, type Static } from '@sinclair/typebox';
import { MAX_FORK_COUNT } from '../util/limits.js';

/** Every request body and answer of the HTTP API; also the source of docs/openapi.json. */

export const ErrorSchema = Type.Object({ code: Type.String(), message: Type.String() });

const Env = Type.Record(Type.String({ maxLength: 1024 }), Type.String({ maxLength: 65536 }), { description: 'environment variables' });
const Id = Type.String({ minLength: 1, maxLength: 64 });
const Tag = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' });
/** A sandbox's lifetime in ms; 0 = until deleted. */
const Lifetime = Type.Integer({ minimum: 0, maximum: 7 * 24 * 3600_000, description: 'lifetime in ms from now; 0 = until deleted' });
const Count = Type.Integer({ minimum: 1, maximum: MAX_FORK_COUNT });

export const IdParams = Type.Object({ id: Id });
export const TagParams = Type.Object({ tag: Tag });

const NetworkBody = Type.Object(
  {
    egress: Type.Optional(
      Type.Union([Type.Literal('none'), Type.Literal('all'), Type.Array(Type.String({ minLength: 1, maxLength: 255 }), { maxItems: 64 })], {
        description: 'where the sandbox may connect: "none" (default), "all" (the internet: anything but the host itself, private networks, link-local and multicast; list a CIDR to reach a private network), or a list of host names, *.domains, IPv4 addresses and CIDRs; DNS answers allowed names only',
      }),
    ),
    ports: Type.Optional(Type.Array(Type.Integer({ minimum: 1, maximum: 65535 }), { maxItems: 32, description: 'guest TCP ports reachable from the host (each sandbox, each fork, gets host ports of its own)' })),
  },
  { additionalProperties: false, description: 'a network of its own (docs/network.md); without it the sandbox has no network device' },
);
const PortMappingSchema = Type.Object({ port: Type.Integer(), host: Type.String({ description: 'host:port on the daemon\'s host that reaches the guest port' }), hostPort: Type.Integer() });

export const CreateBody = Type.Object(
  {
    image: Type.Optional(Type.String({ minLength: 1, maxLength: 128 })),
    memoryMiB: Type.Optional(Type.Integer({ minimum: 256, maximum: 16384 })),
    cpus: Type.Optional(Type.Integer({ minimum: 1, maximum: 64 })),
    env: Type.Optional(Env),
    timeoutMs: Type.Optional(Lifetime),
    engine: Type.Optional(Type.Union([Type.Literal('qemu'), Type.Literal('vmm')], { description: 'default: vmm where the host runs Linux guests on KVM, else qemu' })),
    network: Type.Optional(NetworkBody),
    template: Type.Optional(Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$', description: 'start from this template (warm, its start command running) instead of booting; it fixes image, memoryMiB and cpus' })),
  },
  { additionalProperties: false },
);
export type CreateBody = Static<typeof CreateBody>;

export const SandboxSchema = Type.Object(
  {
    sandboxId: Type.String(),
    parentId: Type.Optional(Type.String()),
    snapshotTag: Type.Optional(Type.String()),
    image: Type.String(),
    engine: Type.Union([Type.Literal('qemu'), Type.Literal('vmm')]),
    memoryMiB: Type.Integer(),
    cpus: Type.Integer(),
    accelerator: Type.String(),
    pid: Type.Integer(),
    startedAt: Type.String(),
    expiresAt: Type.Union([Type.String(), Type.Null()]),
    network: Type.Optional(Type.Object({ egress: NetworkBody.properties.egress, ports: Type.Array(Type.Integer()) })),
    ports: Type.Optional(Type.Array(PortMappingSchema, { description: 'forwarded guest ports and the host addresses that reach them' })),
  },
);

/** A sandbox as the daemon describes it. */
export type SandboxView = Static<typeof SandboxSchema>;

export const ListQuery = Type.Object({ parentId: Type.Optional(Type.String()), snapshotTag: Type.Optional(Type.String()) }, { additionalProperties: false });

export const ExecBody = Type.Object(
  {
    cmd: Type.Union([Type.String({ minLength: 1, maxLength: 1 << 20 }), Type.Array(Type.String({ maxLength: 1 << 20 }), { minItems: 1, maxItems: 4096 })]),
    envs: Type.Optional(Env),
    cwd: Type.Optional(Type.String({ minLength: 1, maxLength: 4095 })),
    timeoutMs: Type.Optional(Type.Integer({ minimum: 0, maximum: 24 * 3600_000, description: 'kill the command after this long; 0 = never (default 60000)' })),
    stdin: Type.Optional(Type.Union([Type.String(), Type.Boolean()], { description: 'data for stdin; with background, true keeps stdin open for POST …/commands/{commandId}/stdin' })),
    background: Type.Optional(Type.Boolean({ description: 'start the command and answer at once with its commandId; read its output from …/commands/{commandId}/output' })),
  },
  { additionalProperties: false },
);
export type ExecBody = Static<typeof ExecBody>;

const ExitSchema = Type.Object({ exitCode: Type.Integer(), timedOut: Type.Optional(Type.Boolean()), signal: Type.Optional(Type.Integer()) });
export const CommandSchema = Type.Object({
  commandId: Type.String(),
  pid: Type.Integer(),
  cmd: Type.Union([Type.String(), Type.Array(Type.String())]),
  startedAt: Type.String(),
  running: Type.Boolean(),
  exit: Type.Optional(ExitSchema),
});
export const CommandParams = Type.Object({ id: Id, commandId: Type.String({ minLength: 1, maxLength: 64 }) });
export const StdinBody = Type.Object(
  { data: Type.Optional(Type.String({ maxLength: 4 << 20 })), close: Type.Optional(Type.Boolean({ description: 'close stdin after writing data' })) },
  { additionalProperties: false },
);
export const SignalBody = Type.Object({ signal: Type.Optional(Type.Integer({ minimum: 1, maximum: 64, description: 'default 9 (SIGKILL)' })) }, { additionalProperties: false });
export const PatchSandboxBody = Type.Object({ timeoutMs: Lifetime }, { additionalProperties: false });
export const PrewarmBody = Type.Object({ size: Type.Integer({ minimum: 0, maximum: MAX_FORK_COUNT }) }, { additionalProperties: false });

export const StreamQuery = Type.Object({ stream: Type.Optional(Type.Union([Type.Literal('0'), Type.Literal('1')])) });

export const ExecResult = Type.Object({
  exitCode: Type.Integer(),
  stdout: Type.String(),
  stderr: Type.String(),
  timedOut: Type.Optional(Type.Boolean()),
  signal: Type.Optional(Type.Integer()),
  truncated: Type.Optional(Type.Object({ stdout: Type.Integer(), stderr: Type.Integer() }, { description: 'bytes of output left out of stdout/stderr (each keeps 16 MiB)' })),
});

export const PathQuery = Type.Object({ path: Type.String({ minLength: 1, maxLength: 4095 }) }, { additionalProperties: false });
export const ReadQuery = Type.Object({ path: Type.String({ minLength: 1, maxLength: 4095 }), maxBytes: Type.Optional(Type.String({ pattern: '^[0-9]{1,15}$', description: 'refuse a file bigger than this many bytes (413)' })) }, { additionalProperties: false });
export const MkdirBody = Type.Object({ path: Type.String({ minLength: 1, maxLength: 4095 }) }, { additionalProperties: false });

export const EntrySchema = Type.Object({
  name: Type.String(),
  path: Type.String(),
  type: Type.Union([Type.Literal('file'), Type.Literal('dir'), Type.Literal('symlink'), Type.Literal('other')]),
  size: Type.Number(),
  mode: Type.Integer(),
  modifiedTime: Type.String(),
});

export const ForkBody = Type.Object({ count: Type.Optional(Count), timeoutMs: Type.Optional(Lifetime) }, { additionalProperties: false });
export const StartBody = Type.Object({ count: Type.Optional(Count), env: Type.Optional(Env), timeoutMs: Type.Optional(Lifetime) }, { additionalProperties: false });
export type StartBody = Static<typeof StartBody>;

/** Per child: its id, or the error that kept it from starting (the others are unaffected). */
export const ChildResults = Type.Array(
  Type.Union([Type.Object({ sandboxId: Type.String() }), Type.Object({ error: Type.Object({ code: Type.String(), message: Type.String() }) })]),
);

export const CodeBody = Type.Object({ code: Type.String({ maxLength: 4 << 20 }), timeoutMs: Type.Optional(Type.Integer({ minimum: 0, maximum: 24 * 3600_000 })) }, { additionalProperties: false });
export const CodeResult = Type.Object({
  value: Type.Optional(Type.String()),
  stdout: Type.String(),
  stderr: Type.String(),
  error: Type.Optional(Type.Object({ name: Type.String(), value: Type.String(), traceback: Type.String() })),
  truncated: Type.Optional(Type.Object({ stdout: Type.Integer(), stderr: Type.Integer() }, { description: 'bytes of output left out of stdout/stderr (each keeps 16 MiB)' })),
});

export const SnapshotBody = Type.Object({ tag: Tag }, { additionalProperties: false });
export const DeleteSnapshotQuery = Type.Object({ cascade: Type.Optional(Type.Union([Type.Literal('0'), Type.Literal('1')])) });

export const SnapshotSchema = Type.Object(
  {
    format: Type.Integer(),
    tag: Type.String(),
    parent: Type.Union([Type.String(), Type.Null()]),
    createdAt: Type.String(),
    sandboxId: Type.String(),
    engine: Type.String(),
    image: Type.String(),
    memoryMiB: Type.Integer(),
    cpus: Type.Integer(),
    files: Type.Record(Type.String(), Type.Object({ sha256: Type.String(), bytes: Type.Number() })),
    verified: Type.Optional(Type.Boolean()),
  },
);

export const Health = Type.Object({ ok: Type.Boolean(), sandboxes: Type.Integer(), pid: Type.Integer(), uptimeS: Type.Number() });
export const Version = Type.Object({ version: Type.String(), api: Type.Literal('v1') });

// ---- images and templates --------------------------------------------------

const Name = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' });
const CopyItem = Type.Union([Type.String({ minLength: 3, maxLength: 8192 }), Type.Object({ from: Type.String({ minLength: 1, maxLength: 4096 }), to: Type.String({ minLength: 1, maxLength: 4096 }) }, { additionalProperties: false })]);
const RootfsChoice = Type.Union([Type.Literal('initramfs'), Type.Literal('disk'), Type.Literal('auto')]);

/** An image recipe: the body of POST /v1/images and the shape of a recipe file (src/images/recipe.ts reads files with it). */
export const ImageRecipe = Type.Object(
  {
    name: Type.Optional(Name),
    packages: Type.Optional(Type.Array(Type.String({ minLength: 1, maxLength: 256 }), { maxItems: 1000 })),
    copy: Type.Optional(Type.Array(CopyItem, { maxItems: 1000 })),
    env: Type.Optional(Type.Record(Type.String({ maxLength: 128 }), Type.String({ maxLength: 65536 }))),
    recommends: Type.Optional(Type.Boolean()),
    rootfs: Type.Optional(RootfsChoice),
  },
  { additionalProperties: false },
);

export const BuildImageBody = Type.Object(
  { ...ImageRecipe.properties, force: Type.Optional(Type.Boolean({ description: 'rebuild even if an identical image exists' })) },
  { additionalProperties: false, description: 'copy sources are paths on the daemon\'s machine, taken on the unix socket only (over TCP, copy is refused)' },
);
export type BuildImageBody = Static<typeof BuildImageBody>;

const ImageSpecView = Type.Object({
  packages: Type.Array(Type.String()),
  copy: Type.Array(Type.Object({ from: Type.String(), to: Type.String() })),
  env: Type.Record(Type.String(), Type.String()),
  recommends: Type.Optional(Type.Boolean()),
  rootfs: RootfsChoice,
});

export const ImageSchema = Type.Object({
  digest: Type.String(),
  names: Type.Array(Type.String()),
  sizeBytes: Type.Integer(),
  createdAt: Type.String(),
  kernel: Type.String(),
  rootfs: Type.Union([Type.Literal('initramfs'), Type.Literal('disk')]),
  spec: ImageSpecView,
  packageCount: Type.Integer(),
});

export const ImageBuildResult = Type.Object({
  digest: Type.String(),
  name: Type.String(),
  createdAt: Type.String(),
  kernel: Type.Object({ package: Type.String(), version: Type.String(), release: Type.String() }),
  packages: Type.Array(Type.String()),
  initramfsBytes: Type.Integer(),
  kernelBytes: Type.Integer(),
  files: Type.Integer(),
  spec: Type.Optional(ImageSpecView),
  rootfs: Type.Optional(Type.Object({ kind: Type.Union([Type.Literal('initramfs'), Type.Literal('disk')]), fs: Type.Optional(Type.String()), file: Type.Optional(Type.String()), bytes: Type.Optional(Type.Integer()) })),
  treeBytes: Type.Optional(Type.Integer()),
  cached: Type.Boolean(),
  seconds: Type.Number(),
});

export const ImageRefParams = Type.Object({ ref: Type.String({ minLength: 1, maxLength: 128 }) });
export const NameParams = Type.Object({ name: Name });

/** A template's recipe: the body of POST /v1/templates and the record src/core/template-store.ts keeps. */
export const TemplateBody = Type.Object(
  {
    name: Name,
    image: Type.Optional(Type.String({ minLength: 1, maxLength: 128 })),
    memoryMiB: Type.Optional(Type.Integer({ minimum: 256, maximum: 16384 })),
    engine: Type.Optional(Type.Union([Type.Literal('qemu'), Type.Literal('vmm')])),
    env: Type.Optional(Type.Record(Type.String({ maxLength: 1024 }), Type.String({ maxLength: 65536 }))),
    network: Type.Optional(
      Type.Object(
        {
          egress: Type.Optional(Type.Union([Type.Literal('none'), Type.Literal('all'), Type.Array(Type.String({ minLength: 1, maxLength: 255 }), { maxItems: 64 })])),
          ports: Type.Optional(Type.Array(Type.Integer({ minimum: 1, maximum: 65535 }), { maxItems: 32 })),
        },
        { additionalProperties: false, description: 'the network its sandboxes get (docs/network.md): each one, and each fork, has its own stack and host ports' },
      ),
    ),
    run: Type.Optional(Type.Array(Type.String({ minLength: 1, maxLength: 1 << 20 }), { maxItems: 256, description: 'shell commands run in order; each must exit 0' })),
    code: Type.Optional(Type.Array(Type.String({ minLength: 1, maxLength: 1 << 20 }), { maxItems: 256, description: 'Python code for the persistent interpreter, run in order after the commands' })),
    start: Type.Optional(Type.String({ minLength: 1, maxLength: 65536, description: 'a long-running command started last, in the background (output to /var/log/clade-start.log)' })),
    ready: Type.Optional(Type.String({ minLength: 1, maxLength: 65536, description: 'polled until it exits 0 before the snapshot is taken' })),
    readyTimeoutMs: Type.Optional(Type.Integer({ minimum: 1, maximum: 3600_000, description: 'how long to poll the ready command (default 120000)' })),
    stepTimeoutMs: Type.Optional(Type.Integer({ minimum: 0, maximum: 24 * 3600_000, description: 'limit for each setup command and code block (default 0: none)' })),
  },
  { additionalProperties: false },
);

export const TemplateSchema = Type.Object({
  ...TemplateBody.properties,
  snapshot: Type.String(),
  imageDigest: Type.String(),
  engineUsed: Type.Union([Type.Literal('qemu'), Type.Literal('vmm')]),
  createdAt: Type.String(),
  setupSeconds: Type.Number(),
});
