// A separate process that owns one sandbox, for tests of what happens when the
// owner is interrupted or killed. Prints the sandbox id, then waits.
import { Sandbox } from '../../src/sdk/index.js';

const sb = await Sandbox.create();
process.stdout.write(`${sb.sandboxId} ${sb.getInfo().pid}\n`);
setInterval(() => undefined, 1000);
