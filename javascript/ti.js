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
    return [];
}
