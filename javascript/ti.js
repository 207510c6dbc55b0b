// Textual Inversion tab (sd-webui-ti): browser-side helpers.

// Re-read the Textual Inversion cards of txt2img and img2img after the extension wrote a file.
// Clicks the host's hidden internal refresh buttons (no page reload needed).
function tiRefreshCards() {
    for (const tab of ["txt2img", "img2img"]) {
        const button = gradioApp().getElementById(`${tab}_textual_inversion_extra_refresh_internal`);
        if (button) {
            button.dispatchEvent(new Event("click"));
        }
    }
    // Tag autocomplete (a1111-sd-webui-tagcomplete), when installed, re-reads the embeddings too.
    if (typeof TAC_CFG !== "undefined") {
        fetch("./tacapi/v1/refresh-embeddings", {method: "POST"}).catch(() => {});
    }
    return [];
}

// The Train button: give the job a task id and show the host's progress bar for it (A1111's
// requestProgress polls /internal/progress with that id). Returns the inputs with the id first.
function tiTrainStart() {
    const args = Array.from(arguments);
    const id = "task(ti-" + Math.random().toString(36).slice(2, 10) + ")";
    args[0] = id;
    const anchor = gradioApp().getElementById("ti_train_progress");
    if (anchor && typeof requestProgress === "function") {
        requestProgress(id, anchor, null, function() {}, null, 120);
    }
    return args;
}

// The Prepare button: as tiTrainStart, with the Prepare view's progress bar.
// A job's button: give it a task id and show the host's progress bar under the anchor.
function tiStartWithProgress(args, kind, anchorId) {
    const id = "task(ti-" + kind + "-" + Math.random().toString(36).slice(2, 10) + ")";
    args[0] = id;
    const anchor = gradioApp().getElementById(anchorId);
    if (anchor && typeof requestProgress === "function") {
        requestProgress(id, anchor, null, function() {}, null, 120);
    }
    return args;
}

function tiPrepareStart() {
    return tiStartWithProgress(Array.from(arguments), "prepare", "ti_prepare_progress");
}

function tiGridStart() {
    return tiStartWithProgress(Array.from(arguments), "grid", "ti_grid_progress");
}

// "Use this folder for training": show the Train view (its folder box was just filled).
function tiShowTrain() {
    const buttons = gradioApp().querySelectorAll("#ti_tabs button");
    for (const button of buttons) {
        if (button.textContent.trim() === "Train") {
            button.click();
            break;
        }
    }
    return [];
}
