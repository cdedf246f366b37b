/**
 * The blockdev-create job: runs one image creator (which driver's, and with which options, is the
 * caller's business) under QEMU's job model. As in QEMU it is not a block job: it emits only
 * JOB_STATUS_CHANGE, is listed by query-jobs and not query-block-jobs, reports its error there, and
 * stays concluded until job-dismiss. Progress is 0 of 1 until the creator returns, then 1 of 1,
 * whatever the outcome (QEMU's numbers).
 */
import { Job, type JobOptions } from "./job.js";

export interface CreateJobOptions extends Omit<JobOptions, "type" | "blockJob" | "autoDismiss"> {
  readonly create: () => Promise<void>;
}

export class CreateJob extends Job {
  readonly #create: () => Promise<void>;

  constructor(options: CreateJobOptions) {
    super({ ...options, type: "create", blockJob: false, autoDismiss: false });
    this.#create = options.create;
    this.progressTotal = 1;
  }

  protected async run(): Promise<void> {
    try {
      await this.#create();
    } finally {
      this.progressCurrent = 1;
    }
  }
}
