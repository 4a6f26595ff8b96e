/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* org.diskchain.DiskChain1.Chain: a top image and its backing files. */

#include "daemon.h"

int chain_object_find(sd_bus *bus, const char *path, const char *iface, void *userdata, void **found,
                      sd_bus_error *error) {
        Image *img = chain_active_from_object(userdata, path);
        if (!img)
                return 0;
        *found = img;
        return 1;
}

#define ACTIVE ((Image *) userdata)

static int property_get_active(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "o", ACTIVE->object);
}

static int property_get_layers(sd_bus *bus, const char *path, const char *iface, const char *prop,
                               sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_auto(GStrv) l = chain_layers(ACTIVE->mgr, ACTIVE);
        return append_objects(reply, l);
}

static int property_get_depth(sd_bus *bus, const char *path, const char *iface, const char *prop,
                              sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        g_auto(GStrv) l = chain_layers(ACTIVE->mgr, ACTIVE);
        return sd_bus_message_append(reply, "u", g_strv_length(l));
}

static int property_get_size(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "t", ACTIVE->virtual_size);
}

/* Jobs and exports arrive with the block-job and NBD issues; until then a
 * chain has none, which is the truth, not a placeholder. */
static int property_get_none(sd_bus *bus, const char *path, const char *iface, const char *prop,
                             sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "ao", 0);
}

const sd_bus_vtable chain_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("Active", "o", property_get_active, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Layers", "ao", property_get_layers, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Depth", "u", property_get_depth, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("VirtualSize", "t", property_get_size, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Jobs", "ao", property_get_none, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Exports", "ao", property_get_none, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_VTABLE_END,
};
